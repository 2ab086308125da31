"""Train a BERT WordPiece vocabulary from the corpus (used when no tokenizer is given).

Same pipeline as Google's BERT tokenizer: ``BertNormalizer`` (clean control characters, put spaces
around CJK characters, and for *uncased* models lower-case and strip accents), ``BertPreTokenizer``
(whitespace + punctuation), WordPiece with ``##`` continuation pieces, ``[CLS] A [SEP] B [SEP]``
post-processing. The result is saved as a ``BertTokenizerFast`` so ``AutoTokenizer.from_pretrained``
loads it with no project code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from distilflow.tasks.core.config import Config, require
from distilflow.tasks.core.io import expand_inputs
from distilflow.tasks.core.readers import BadRecord
from distilflow.tasks.prepare.shard import ShardConfig, iter_documents, plan_shard_units

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class VocabConfig(Config):
    vocab_size: int = 30000
    lowercase: bool = True  # uncased (lower-case + strip accents), as bert-base-uncased
    min_frequency: int = 2
    limit_alphabet: int = 1000

    def check(self) -> None:
        n = type(self).__name__
        require(len(SPECIAL_TOKENS) + 100 <= self.vocab_size <= 1_000_000, n, "vocab_size",
                f"must be in [105, 1000000], got {self.vocab_size}")
        require(self.min_frequency >= 1, n, "min_frequency", "must be >= 1")


def corpus_texts(inputs: list[str], shard_cfg: ShardConfig | None = None) -> Iterator[str]:
    """Stream document texts of the inputs with the same readers as the shard stage (bad records skipped)."""
    cfg = shard_cfg or ShardConfig()
    for unit in plan_shard_units(expand_inputs(inputs)):
        for item in iter_documents(unit, cfg):
            if not isinstance(item, BadRecord):
                yield item[0]


def train_wordpiece(texts: Iterable[str], output_dir: str, cfg: VocabConfig):
    """Train on ``texts`` and ``save_pretrained`` into ``output_dir``; returns the BertTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]  # lazy export in v5

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=cfg.lowercase, lowercase=cfg.lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                        special_tokens=SPECIAL_TOKENS, limit_alphabet=cfg.limit_alphabet,
                                        continuing_subword_prefix="##")
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=cfg.lowercase, strip_accents=cfg.lowercase,
                             unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                             mask_token="[MASK]")
    fast.save_pretrained(output_dir)
    return fast
