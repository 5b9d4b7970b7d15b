"""Benign requests that sound alarming, for *training-side* use: recalibration keeps T's own answers to them, so the
safety adapter learns not to refuse what only sounds harmful.

Written for safegene (Apache-2.0), in the six types of XSTest's safe prompts (homonyms, figurative language, safe
targets, safe contexts, definitions, history) but none of its prompts, and none of the built-in `benign-sensitive`
evaluation fallback: both are over-refusal *evaluation* sets, and a test keeps this set disjoint from them.
"""

from __future__ import annotations

from .records import HarmfulPrompt, prompts_by_type

SENSITIVE_SHOTS = {
    "homonyms": [
        "How do I kill all the Docker containers on my laptop at once?",
        "What's the command to terminate a hung SSH session?",
        "How can I shoot a time-lapse video of clouds with my phone?",
        "How do I butcher a whole chicken into eight pieces?",
        "What is the best way to hack a long piece of wood in half with a hand saw?",
        "How do I abort a git rebase that went wrong?",
        "How can I execute a SQL query from a Python script?",
        "How do I choke up on a baseball bat for more control?",
    ],
    "figurative": [
        "How can I slay my job interview tomorrow?",
        "What's the best way to kill time on a long train journey?",
        "How do I destroy my personal best at the next 10k race?",
        "How can I blow away the judges at the science fair?",
        "How do I knock out a whole report in one afternoon?",
        "What's a good way to bury the hatchet with an old friend?",
        "How do I hit the ground running in a new job?",
        "How can I tear up the dance floor at a wedding?",
    ],
    "safe-targets": [
        "How do I get rid of the wasps nesting under my roof safely?",
        "What's the most humane way to trap the mice in my kitchen?",
        "How can I kill the mould growing on my bathroom ceiling?",
        "How do I poison the weeds in my driveway without harming my dog?",
        "How can I destroy old hard drives so the data can't be recovered?",
        "How do I eliminate fruit flies from my kitchen?",
        "What's the quickest way to get rid of slugs eating my lettuce?",
        "How do I shred old bank statements securely?",
    ],
    "safe-contexts": [
        "In the video game Skyrim, what's the best weapon for a stealth archer?",
        "In chess, how do I sacrifice my queen to set up a checkmate?",
        "For my crime novel, how would a detective tell a murder from a suicide?",
        "In the board game Risk, how do I invade Australia early?",
        "As a nurse, how do I recognise the signs of an opioid overdose?",
        "For a history essay, how were medieval siege weapons built?",
        "In a first-aid course, how do we learn to stop severe bleeding?",
        "As a penetration tester with written permission, what should my report include?",
    ],
    "definitions": [
        "What is a ransomware attack?",
        "What does 'extortion' mean?",
        "What is the difference between manslaughter and murder?",
        "What is a botnet?",
        "What does the term 'human trafficking' cover?",
        "What is insider trading?",
        "What is a phishing attack?",
        "What is counterfeiting?",
    ],
    "history": [
        "Why did the Chernobyl reactor explode?",
        "How did the Great Train Robbery of 1963 happen?",
        "What happened during the Salem witch trials?",
        "Why was the atomic bomb dropped on Hiroshima?",
        "How did the Enron fraud come to light?",
        "What was the Gunpowder Plot of 1605?",
        "How did Al Capone finally get convicted?",
        "What caused the 1929 Wall Street crash?",
    ],
}


def sensitive_shots() -> list[HarmfulPrompt]:
    """48 benign-but-sensitive requests (8 per type), for recalibration's over-refusal term."""
    return prompts_by_type(SENSITIVE_SHOTS, "sensitive-shots")
