"""Batch extractive question answering (question + context -> answer, score, start, end).

Post-processing has the semantics of the transformers (4.x) ``question-answering`` pipeline, which
transformers 5 removed (its span scorer ``select_starts_ends`` survives in
``transformers.pipelines.document_question_answering`` and is used here):

* the context is split into overlapping features (``max_seq_len`` tokens, ``doc_stride`` overlap,
  ``truncation="only_second"``, question first);
* in each feature, non-context tokens get -10000 before the softmax over start and end logits,
  [CLS] is then excluded, spans with end < start or longer than ``max_answer_len`` are dropped;
  ``top_k * 2 + 10`` candidates per feature are kept when aligning to words;
* a span is mapped to characters through the word it starts/ends in (``align_to_words``); answers with
  the same text (case-insensitive) from several features add up their scores; best ``top_k`` win.

Rows run in length-sorted batches of features (batch_io machinery, like fill-mask and embed).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from distilflow.tasks.core.errors import InputError
from distilflow.tasks.core.hf import load_pretrained, local_model, resolve_device
from distilflow.tasks.infer.batch_io import ErrorRow, InputRow, WindowResult, length_sorted_batches
from distilflow.tasks.infer.config import QAConfig
from distilflow.tasks.infer.streams import map_batches, streams_for

QA_SCHEMA = pa.schema([
    pa.field("row_id", pa.int64(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("start", pa.int32(), nullable=False),
    pa.field("end", pa.int32(), nullable=False),
])


@functools.lru_cache(maxsize=2)
def load_qa(model: str, device: str = "auto") -> tuple[Any, torch.nn.Module, torch.device]:
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    dev = resolve_device(device)
    path = local_model(model)  # once: an s3:// folder is listed and verified once, model and tokenizer read from it
    m = load_pretrained(AutoModelForQuestionAnswering, path).eval().to(dev)
    tok = AutoTokenizer.from_pretrained(path)  # after the model: a missing folder is named as such
    if not tok.is_fast:
        raise InputError(f"{model}: batch QA needs a fast tokenizer (tokenizer.json: offsets / word ids)")
    return tok, m, dev


class QuestionAnswerer:
    def __init__(self, cfg: QAConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.tokenizer, self.model, self.device = load_qa(cfg.model, cfg.device)
        self.input_columns = (cfg.question_column, cfg.context_column)
        self.streams = streams_for(self.device, cfg.threads)
        limit = int(getattr(self.model.config, "max_position_embeddings", cfg.max_seq_len))
        self.max_seq_len = min(cfg.max_seq_len, limit, int(self.tokenizer.model_max_length or limit))
        self.doc_stride = min(cfg.doc_stride, self.max_seq_len // 2)
        self.question_first = self.tokenizer.padding_side == "right"

    def schema(self) -> pa.Schema:
        return QA_SCHEMA

    def _encode(self, question: str, context: str) -> Any:
        first, second = (question, context) if self.question_first else (context, question)
        return self.tokenizer(
            text=first, text_pair=second, padding=False,
            truncation="only_second" if self.question_first else "only_first",
            max_length=self.max_seq_len, stride=self.doc_stride, return_token_type_ids=True,
            return_overflowing_tokens=True, return_offsets_mapping=True)

    def _logits(self, feats: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(start, end) float32 logits per feature, run in length-sorted batches."""
        out: list[Any] = [None] * len(feats)
        pad = self.tokenizer.pad_token_id or 0

        @torch.inference_mode()  # per call: batches may run in other threads (tasks/infer/streams.py)
        def logits(b: list[int]) -> tuple[np.ndarray, np.ndarray]:
            longest = max(len(feats[i]["input_ids"]) for i in b)
            batch: dict[str, torch.Tensor] = {}
            for name in ("input_ids", "attention_mask", "token_type_ids"):
                if name == "token_type_ids" and "token_type_ids" not in self.tokenizer.model_input_names:
                    continue
                fill = pad if name == "input_ids" else 0
                t = torch.full((len(b), longest), fill, dtype=torch.long)
                for j, i in enumerate(b):
                    v = feats[i][name]
                    t[j, : len(v)] = torch.tensor(v)
                batch[name] = t.to(self.device)
            o = self.model(**batch)
            return o.start_logits.float().cpu().numpy(), o.end_logits.float().cpu().numpy()

        batches = length_sorted_batches([len(f["input_ids"]) for f in feats], self.cfg.batch_size)
        for b, (start, end) in zip(batches, map_batches(logits, batches, self.streams), strict=True):
            for j, i in enumerate(b):
                n = len(feats[i]["input_ids"])
                out[i] = (start[j, :n], end[j, :n])
        return out

    def process(self, rows: list[InputRow], url: str = "") -> WindowResult:
        cfg = self.cfg
        errors: list[ErrorRow] = []
        feats: list[dict[str, Any]] = []
        owner: list[int] = []  # feature -> index in rows
        encs: dict[int, Any] = {}
        for k, r in enumerate(rows):
            try:
                enc = self._encode(r.values[cfg.question_column], r.values[cfg.context_column])
            except Exception as e:  # the question alone does not fit: tokenizer refuses to truncate
                errors.append(ErrorRow(url, r.row_id, r.line, "question_too_long", str(e)[:200]))
                continue
            encs[k] = enc
            for span in range(len(enc["input_ids"])):
                feats.append({n: enc[n][span] for n in ("input_ids", "attention_mask", "token_type_ids")
                              if n in enc} | {"span": span})
                owner.append(k)
        logits = self._logits(feats) if feats else []
        per_row: dict[int, list[int]] = {}
        for fi, k in enumerate(owner):
            per_row.setdefault(k, []).append(fi)
        cols: dict[str, list[Any]] = {n: [] for n in QA_SCHEMA.names}
        json_items = []
        for k, fis in per_row.items():
            answers = self._postprocess(rows[k].values[cfg.context_column], encs[k],
                                        [feats[i] for i in fis], [logits[i] for i in fis])
            for rank, a in enumerate(answers, start=1):
                cols["row_id"].append(rows[k].row_id)
                cols["rank"].append(rank)
                cols["answer"].append(a["answer"])
                cols["score"].append(a["score"])
                cols["start"].append(a["start"])
                cols["end"].append(a["end"])
            json_items.append((rows[k].row_id, answers[0] if len(answers) == 1 else answers))
        return WindowResult(cols, list(cols["row_id"]), json_items, errors,
                            {"features": len(feats)})

    def _postprocess(self, context: str, enc: Any, feats: list[dict[str, Any]],
                     logits: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, Any]]:
        """The pipeline's ``postprocess`` for one example (all its features)."""
        # imported here: transformers.pipelines costs ~3 s of start-up that fill-mask and embed never need
        from transformers.pipelines.document_question_answering import select_starts_ends

        cfg = self.cfg
        tok = self.tokenizer
        min_null_score = 1000000.0
        answers: list[dict[str, Any]] = []
        pre_topk = cfg.top_k * 2 + 10 if cfg.align_to_words else cfg.top_k
        seq_index = 1 if self.question_first else 0
        for f, (start, end) in zip(feats, logits, strict=True):
            span = f["span"]
            seq_ids = enc.sequence_ids(span)
            # 1 = cannot be in the answer: question, special tokens; [CLS] stays 0 (null answer)
            p_mask = np.array([(s != 1) if self.question_first else 0 for s in seq_ids], dtype=np.int64)
            p_mask[np.array(f["input_ids"]) == tok.cls_token_id] = 0
            attention = np.array(f["attention_mask"], dtype=np.int64)[None]
            starts, ends, scores, min_null_score = select_starts_ends(
                start[None], end[None], p_mask, attention, min_null_score, pre_topk,
                cfg.handle_impossible_answer, cfg.max_answer_len)
            e_obj = enc.encodings[span]
            for s, e, score in zip(starts, ends, scores, strict=True):
                s_char, e_char = _char_span(e_obj, int(s), int(e), seq_index, cfg.align_to_words)
                text = context[s_char:e_char]
                same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
                if same:
                    same["score"] += score.item()
                else:
                    answers.append({"score": score.item(), "start": s_char, "end": e_char, "answer": text})
        if cfg.handle_impossible_answer:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        return sorted(answers, key=lambda a: a["score"], reverse=True)[: cfg.top_k]


def _char_span(enc: Any, s: int, e: int, seq_index: int, align_to_words: bool) -> tuple[int, int]:
    if align_to_words:
        try:
            start_word, end_word = enc.token_to_word(s), enc.token_to_word(e)
            return (enc.word_to_chars(start_word, sequence_index=seq_index)[0],
                    enc.word_to_chars(end_word, sequence_index=seq_index)[1])
        except Exception:  # tokenizers without word ids: keep token offsets (as the pipeline does)
            pass
    return enc.offsets[s][0], enc.offsets[e][1]
