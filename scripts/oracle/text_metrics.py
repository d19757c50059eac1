"""Reference answer metrics for `evaluate --generate`, independent of lmms-ft.

Usage: python text_metrics.py PAIRS.json

PAIRS.json is a list of [prediction, reference]. Prints one JSON list with, per pair,
`exact_match` and `token_f1` as the official SQuAD v2.0 evaluation script computes them
(its `normalize_answer`, `compute_exact`, `compute_f1`, restated below), and ROUGE-L F1 from
Google's `rouge_score` package: `rouge_l` with a tokenizer that keeps every letter and digit
(`str.isalnum`), and `rouge_l_default` with the package's own ASCII tokenizer.
"""

import collections
import json
import re
import string
import sys

from rouge_score import rouge_scorer


def normalize_answer(s):
    def remove_articles(text):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def compute_exact(a_gold, a_pred):
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold, a_pred):
    gold_toks = normalize_answer(a_gold).split()
    pred_toks = normalize_answer(a_pred).split()
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


class AlnumTokenizer:
    def tokenize(self, text):
        tokens, word = [], ""
        for ch in text.lower():
            if ch.isalnum():
                word += ch
            elif word:
                tokens.append(word)
                word = ""
        return tokens + ([word] if word else [])


alnum = rouge_scorer.RougeScorer(["rougeL"], tokenizer=AlnumTokenizer())
default = rouge_scorer.RougeScorer(["rougeL"])
with open(sys.argv[1]) as f:
    pairs = json.load(f)
print(json.dumps([
    {"exact_match": compute_exact(ref, pred), "token_f1": compute_f1(ref, pred),
     "rouge_l": alnum.score(ref, pred)["rougeL"].fmeasure,
     "rouge_l_default": default.score(ref, pred)["rougeL"].fmeasure}
    for pred, ref in pairs
]))
