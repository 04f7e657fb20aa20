"""Benchmark metrics: VQA accuracy (the official evaluation's per-question value, quirks
included, in the three variants in circulation), OK-VQA stemming, COCO caption metrics through
pycocoevalcap, ROC-AUC.

The VQA normalisation reproduces GT-Vision-Lab/VQA ``vqaEval.py`` exactly, including what looks
like bugs, so that our numbers compare with published ones:

* the punctuation rule looks at the *original* text to decide between deleting and spacing;
* the period regex ``(?!<=\\d)(\\.)(?!\\d)`` (a malformed look-behind) is applied with
  ``re.UNICODE`` passed as the substitution *count*, i.e. at most 32 periods are removed;
* accuracy is the mean over the ten leave-one-out subsets of ``min(1, matches / 3)``.

What is normalised depends on the variant (:data:`VQA_METRICS`); they score the same
prediction differently where the ten answers are all identical (``Yes`` against ten ``yes``:
0 / 100 / 100; ``two`` against ten ``two``: 100 / 0 / 100, official / official_2016 /
openflamingo).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCTUATION = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, re.UNICODE)  # (sic) re.UNICODE is the count argument


def process_digit_article(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_prediction(prediction: str) -> str:
    text = prediction.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


VQA_METRICS = {
    "official": "vqaEval.py as it is since its 2021 fix (GT-Vision-Lab/VQA a013f00): the "
    "prediction and the answers are normalised (punctuation, digits, articles) only when the "
    "answers are not all identical; otherwise compared as they are, case included",
    "official_2016": "vqaEval.py before that fix: the prediction always normalised, the "
    "answers only punctuation-normalised and only when not all identical",
    "openflamingo": "OpenFlamingo's copy (open_flamingo/eval/vqa_metric.py): the prediction "
    "and the answers always normalised",
}


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], variant: str = "official") -> float:
    """The VQA accuracy of one prediction against its (usually ten) answers, 0..1, as the
    ``variant`` of the official evaluation computes it (:data:`VQA_METRICS`)."""
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    if variant not in VQA_METRICS:
        raise ValueError(f"unknown VQA metric {variant!r}; choose one of {sorted(VQA_METRICS)}")
    if variant == "official_2016":  # the answers as they are: cleaned only after the fix
        answers, res = list(gt_answers), normalize_prediction(prediction)
        if len(set(answers)) > 1:
            answers = [process_punctuation(a) for a in answers]
        return _leave_one_out(res, answers)
    answers = [_clean(a) for a in gt_answers]
    res = _clean(prediction)
    if variant == "openflamingo" or len(set(answers)) > 1:
        res = process_digit_article(process_punctuation(res))
        answers = [process_digit_article(process_punctuation(a)) for a in answers]
    return _leave_one_out(res, answers)


def _leave_one_out(res: str, answers: list[str]) -> float:
    """The mean over the leave-one-out subsets of the answers of ``min(1, matches / 3)``."""
    accs = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1 :]
        accs.append(min(1.0, sum(a == res for a in others) / 3))
    return sum(accs) / len(accs)


def okvqa_stem(text: str) -> str:
    """OK-VQA compares stemmed answers: each word through the Porter stemmer."""
    from nltk.stem import PorterStemmer

    stemmer = PorterStemmer()
    return " ".join(stemmer.stem(w) for w in text.split())


def okvqa_accuracy(prediction: str, gt_answers: Sequence[str], variant: str = "official") -> float:
    """VQA accuracy (``variant``) after stemming the normalised prediction and answers."""
    return vqa_accuracy(
        okvqa_stem(normalize_prediction(prediction)), [okvqa_stem(a) for a in gt_answers], variant
    )


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    pairs = sorted(zip(scores, labels, strict=True))
    n_pos = sum(1 for _, y in pairs if y == 1)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both positive and negative labels")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        average_rank = (i + j + 1) / 2  # ranks are 1-based
        rank_sum += average_rank * sum(1 for _, y in pairs[i:j] if y == 1)
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def caption_scores(
    predictions: dict[str, str], references: dict[str, list[str]], meteor: bool = True
) -> dict[str, float]:
    """CIDEr, BLEU-4 (and METEOR when Java runs) with pycocoevalcap's PTB tokenizer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    missing = set(references) - set(predictions)
    if missing:
        raise ValueError(f"no prediction for {len(missing)} image(s), e.g. {sorted(missing)[:3]}")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    scores = {"CIDEr": float(Cider().compute_score(gts, res)[0])}
    scores["BLEU-4"] = float(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()  # a Java subprocess
        try:
            scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            getattr(scorer, "close", lambda: None)()
    return scores
