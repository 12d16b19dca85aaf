"""COCO caption metrics computed the way the COCO caption evaluation does (paper Table 1).

Pipeline (pycocoevalcap, as in ``pycocoevalcap.eval.COCOEvalCap`` minus SPICE):
``PTBTokenizer`` (Stanford CoreNLP 3.4.1 via Java: lower-cases, splits, drops punctuation) on
predictions and references, then ``Bleu(4)``, ``Meteor()`` (METEOR 1.5 jar, Java), ``Rouge()``
(ROUGE-L) and ``Cider()`` (the CIDEr-D variant COCO reports as "CIDEr"). SPICE is left out: it
downloads Stanford CoreNLP models at first use and fails offline.

Scores are returned raw, as pycocoevalcap computes them (BLEU, METEOR, ROUGE-L in [0, 1], CIDEr in
[0, 10]), under COCO's names (``Bleu_1`` ... ``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``), and again
multiplied by 100 under ``scaled`` -- the convention of the paper's table (Stage 2 CIDEr 76.2 is a raw
0.762).

Two properties to keep in mind when reading the numbers:
- CIDEr weights n-grams by their inverse document frequency over the *references of this call*, so
  CIDEr is comparable only between prediction sets scored against the same references; with a single
  image every IDF is 0 and CIDEr is 0 whatever the caption.
- Java start-up dominates small calls: the PTB tokenizer costs ~0.7 s and METEOR's JVM plus paraphrase
  table ~9 s on this 2-core machine (one full call on 3 images: ~10 s). ``CaptionEvaluator`` keeps one
  METEOR process alive across calls (e.g. one per checkpoint); ``caption_metrics`` starts and stops one.

Prompt formats (what the captions are generated from; ``caption_prompt``): ``raw`` is the caption prompt
``"<image>\\n"`` Stages 1-2 and the dense control train on; ``chat`` is the Mistral ``[INST]`` conversation Stage 3
trains on, rendered by the processor's chat template, the user asking ``"Describe the image."`` (the Shapes
instruct data's description question). ``training_prompt_format`` reads a stage's own format from its recipe.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from configuration.contract import COMPLETION_MARKER, RECIPE_FILE

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
JAVA_HINT = (
    "pycocoevalcap needs a Java runtime on PATH for the PTB tokenizer and METEOR; "
    "install one, e.g. `apt-get install default-jre-headless`"
)
_MAX_LISTED_IDS = 50

PROMPT_FORMATS = ("raw", "chat")
RAW_CAPTION_PROMPT = "<image>\n"  # the caption format's prompt: <s> [IMG]... <0x0A>, then the caption
# The Shapes instruct data's description question (trainer.data.shapes._Q_DESCRIBE[0]; a test keeps them equal).
CHAT_CAPTION_INSTRUCTION = "Describe the image."


def chat_prompt(processor, text: str) -> str:
    """The chat template's prompt for one user turn holding the image, then ``text``, ready for the answer:
    ``<s>[INST] <image>\n{text} [/INST]`` (Stage 3's conversations put the image before the first question)."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("a chat-format prompt needs a processor with a chat template; this one has none")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def caption_prompt(processor, prompt_format: str = "raw") -> str:
    """The text the processor turns into a captioning prompt in ``prompt_format`` (see the module doc): ``raw`` ->
    ``"<image>\\n"``; ``chat`` -> the chat template's ``<s>[INST] <image>\\nDescribe the image. [/INST]``."""
    if prompt_format == "raw":
        return RAW_CAPTION_PROMPT
    if prompt_format == "chat":
        return chat_prompt(processor, CHAT_CAPTION_INSTRUCTION)
    raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")


def _trained_on_conversations(recipe: Mapping) -> bool:
    """Whether a resolved recipe trains on conversations (the collator's instruct format): LLaVA-Instruct, or the
    ``instruct`` split (Shapes); a recipe without a split is Stage 3's."""
    if recipe.get("dataset") == "llava":
        return True
    split = recipe.get("train_split")
    return split == "instruct" if split else str(recipe.get("stage")) == "3"


def training_prompt_format(model_dir: str | Path, processor=None) -> str:
    """The prompt format a model was trained to answer in: from the stage directory's ``recipe.yaml`` (conversation
    data -> ``chat``), else its completion marker (Stage 3 -> ``chat``), else ``processor.prompt_format`` (what a
    Hub copy carries), else ``raw``."""
    directory = Path(model_dir)
    recipe_path, marker_path = directory / RECIPE_FILE, directory / COMPLETION_MARKER
    if recipe_path.is_file():
        import yaml

        recipe = yaml.safe_load(recipe_path.read_text()) or {}
        return "chat" if _trained_on_conversations(recipe) else "raw"
    if marker_path.is_file():
        return "chat" if str(json.loads(marker_path.read_text()).get("stage")) == "3" else "raw"
    fmt = getattr(processor, "prompt_format", None)
    return fmt if fmt in PROMPT_FORMATS else "raw"


def evaluation_prompt_formats(training_format: str, requested: Sequence[str] | None = None) -> list[str]:
    """The formats to caption in: ``requested`` (default: the stage's own ``training_format``), with ``raw`` always
    first (the format every stage is compared on, and the one ``captioning.json``'s top-level keys hold)."""
    formats = list(requested) if requested else [training_format]
    unknown = [f for f in formats if f not in PROMPT_FORMATS]
    if unknown:
        raise ValueError(f"unknown prompt format(s) {unknown}; choose from {PROMPT_FORMATS}")
    return ["raw"] + [f for f in dict.fromkeys(formats) if f != "raw"]


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(f"`java` not found. {JAVA_HINT}")


def _ids_text(ids: Sequence) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:20])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > 20 else "")


def _clean(text: str) -> str:
    # One line per caption: the tokenizer and METEOR speak a line protocol, so any line break
    # (\n, \r, \u2028, ...) inside a caption would misalign every caption after it.
    return " ".join(text.split())


def validate_captions(predictions: Mapping, references: Mapping) -> dict:
    """Check a prediction/reference pair and describe it; raise ValueError naming offending ids.

    predictions: {id: str}; references: {id: [str, ...]} with the same ids. Errors: ids present on one
    side only, a prediction that is not a string, references that are not a non-empty list/tuple of
    strings, an empty or blank reference string, no ids at all. Empty (or blank) predictions are
    allowed -- a model can emit nothing -- and are counted.

    Returns dict(n_images, n_references, n_empty_predictions, empty_prediction_ids (at most 50)).
    """
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise ValueError("predictions must be {id: str} and references {id: [str, ...]} mappings")
    if not predictions:
        raise ValueError("no predictions to score")
    only_pred = [i for i in predictions if i not in references]
    only_ref = [i for i in references if i not in predictions]
    problems = []
    if only_pred:
        problems.append(f"ids in predictions without references: {_ids_text(only_pred)}")
    if only_ref:
        problems.append(f"ids in references without predictions: {_ids_text(only_ref)}")
    not_str = [i for i, p in predictions.items() if not isinstance(p, str)]
    if not_str:
        problems.append(f"predictions that are not strings: {_ids_text(not_str)}")
    bad_refs = [
        i
        for i, r in references.items()
        if isinstance(r, str) or not isinstance(r, Sequence) or not all(isinstance(s, str) for s in r)
    ]
    if bad_refs:
        problems.append(f"references that are not lists of strings: {_ids_text(bad_refs)}")
    empty_lists = [i for i, r in references.items() if i not in bad_refs and len(r) == 0]
    if empty_lists:
        problems.append(f"empty reference lists: {_ids_text(empty_lists)}")
    blank_refs = [i for i, r in references.items() if i not in bad_refs and any(not s.strip() for s in r)]
    if blank_refs:
        problems.append(f"empty reference strings: {_ids_text(blank_refs)}")
    if problems:
        raise ValueError("invalid caption input: " + "; ".join(problems))
    empty = [i for i, p in predictions.items() if not p.strip()]
    return {
        "n_images": len(predictions),
        "n_references": int(sum(len(r) for r in references.values())),
        "n_empty_predictions": len(empty),
        "empty_prediction_ids": empty[:_MAX_LISTED_IDS],
    }


class CaptionEvaluator:
    """Scores caption sets with pycocoevalcap, keeping one METEOR JVM alive between calls.

    Use as a context manager (or call ``close()``)::

        with CaptionEvaluator() as ev:
            stage2 = ev.evaluate(preds2, refs)
            stage3 = ev.evaluate(preds3, refs)

    ``meteor=False`` skips METEOR (``METEOR`` is then None) and its ~9 s start-up.
    """

    def __init__(self, meteor: bool = True):
        try:
            import pycocoevalcap  # noqa: F401
        except ImportError as err:  # pragma: no cover - a dependency of the project
            raise ImportError("caption metrics need `pip install pycocoevalcap`") from err
        _require_java()
        self.use_meteor = meteor
        self._meteor = None

    def __enter__(self) -> CaptionEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the METEOR process (idempotent)."""
        meteor, self._meteor = getattr(self, "_meteor", None), None
        if meteor is None:
            return
        if meteor.lock.locked():  # a failed compute_score left it held; Meteor.__del__ would hang on it
            meteor.lock.release()
        with meteor.lock:
            meteor.meteor_p.stdin.close()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()

    def _get_meteor(self):
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()
        return self._meteor

    def _tokenize(self, predictions: Mapping, references: Mapping) -> tuple[dict, dict]:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        # One JVM for both sides: tag the keys, tokenize together, split back.
        batch = {("ref", i): [{"caption": _clean(s)} for s in references[i]] for i in predictions}
        batch.update({("pred", i): [{"caption": _clean(p)}] for i, p in predictions.items()})
        try:
            tokens = PTBTokenizer().tokenize(batch)
        except OSError as err:
            raise RuntimeError(f"the PTB tokenizer failed to run: {err}. {JAVA_HINT}") from err
        if any(len(tokens.get(key, ())) != len(value) for key, value in batch.items()):
            raise RuntimeError("the PTB tokenizer returned a different number of captions than it was given")
        gts = {i: tokens[("ref", i)] for i in predictions}
        res = {i: tokens[("pred", i)] for i in predictions}
        return gts, res

    def evaluate(self, predictions: Mapping, references: Mapping, per_image: bool = False) -> dict:
        """Score ``predictions`` {id: str} against ``references`` {id: [str, ...]} (see the module doc).

        Returns dict(Bleu_1, Bleu_2, Bleu_3, Bleu_4, METEOR, ROUGE_L, CIDEr (raw pycocoevalcap values;
        METEOR None when disabled), scaled (the same x 100), n_images, n_references,
        n_empty_predictions, empty_prediction_ids, tokenizer, notes, and per_image {id: {metric: raw}}
        when ``per_image``).
        """
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        info = validate_captions(predictions, references)
        gts, res = self._tokenize(predictions, references)
        ids = list(gts)

        scores: dict[str, Any] = {}
        per: dict[str, list[float]] = {}
        bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            scores[f"Bleu_{n + 1}"] = float(bleu[n])
            per[f"Bleu_{n + 1}"] = [float(x) for x in bleu_per[n]]
        scores["METEOR"] = None
        if self.use_meteor:
            # METEOR's line protocol uses ' ||| ' as a separator; it strips it from hypotheses only.
            meteor_gts = {i: [r.replace("|||", "") for r in refs] for i, refs in gts.items()}
            try:
                meteor, meteor_per = self._get_meteor().compute_score(meteor_gts, res)
            except Exception as err:
                self.close()  # the process state is unknown now; the next call starts a fresh one
                raise RuntimeError(f"METEOR failed: {err!r}. {JAVA_HINT}") from err
            scores["METEOR"] = float(meteor)
            per["METEOR"] = [float(x) for x in meteor_per]
        rouge, rouge_per = Rouge().compute_score(gts, res)
        scores["ROUGE_L"], per["ROUGE_L"] = float(rouge), [float(x) for x in rouge_per]
        cider, cider_per = Cider().compute_score(gts, res)
        scores["CIDEr"], per["CIDEr"] = float(cider), [float(x) for x in cider_per]

        notes = [
            "CIDEr's IDF comes from this call's references: compare CIDEr only on the same reference set"
        ]
        if info["n_images"] == 1:
            notes.append("a single image makes every CIDEr IDF 0, so CIDEr is 0")
        out: dict[str, Any] = dict(scores)
        out["scaled"] = {k: (None if v is None else 100.0 * v) for k, v in scores.items()}
        out.update(info)
        out["tokenizer"] = "PTBTokenizer (Stanford CoreNLP 3.4.1): lower-cased, punctuation removed"
        out["notes"] = notes
        if per_image:
            out["per_image"] = {i: {k: v[n] for k, v in per.items()} for n, i in enumerate(ids)}
        return out


def caption_metrics(
    predictions: Mapping,
    references: Mapping,
    meteor: bool = True,
    per_image: bool = False,
    evaluator: CaptionEvaluator | None = None,
) -> dict:
    """COCO caption metrics of ``predictions`` {id: str} against ``references`` {id: [str, ...]}.

    One-shot wrapper around ``CaptionEvaluator.evaluate`` (see there for the keys); pass ``evaluator``
    to reuse a running METEOR process. Raises ValueError for inconsistent input (naming the ids) and
    RuntimeError when Java is missing. Takes ~10 s with METEOR (JVM start), ~1 s without.
    """
    if evaluator is not None:
        return evaluator.evaluate(predictions, references, per_image=per_image)
    validate_captions(predictions, references)  # fail on bad input before starting any JVM
    with CaptionEvaluator(meteor=meteor) as ev:
        return ev.evaluate(predictions, references, per_image=per_image)


__all__ = [
    "CHAT_CAPTION_INSTRUCTION",
    "METRICS",
    "PROMPT_FORMATS",
    "RAW_CAPTION_PROMPT",
    "CaptionEvaluator",
    "caption_metrics",
    "caption_prompt",
    "chat_prompt",
    "evaluation_prompt_formats",
    "training_prompt_format",
    "validate_captions",
]
