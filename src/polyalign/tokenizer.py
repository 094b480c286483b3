"""Text → (ids, mask): a BPE tokenizer trained on the captions with the `tokenizers` library, or a model's own."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from polyalign.errors import PolyalignError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class Tokenizer:
    """Pads/truncates to ``context_length``; returns int64 ids (B, L) and a bool mask (B, L), True on real tokens."""

    def __init__(self, tok: HFTokenizer, context_length: int):
        self.tok = tok
        self.context_length = context_length
        pad_id = tok.token_to_id("[PAD]")
        if pad_id is None:
            raise ValueError("the tokenizer has no [PAD] token")
        tok.enable_truncation(context_length)
        tok.enable_padding(length=context_length, pad_id=pad_id, pad_token="[PAD]")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, context_length: int) -> "Tokenizer":
        """Learn a BPE vocabulary (lower-cased, accents stripped, SentencePiece-style word starts) from ``texts``.

        Word starts are marked in the text (Metaspace) rather than by a continuation prefix: the library gives
        prefixed pieces ids in hash-map order, which made the vocabulary differ from process to process.
        """
        tok = HFTokenizer(models.BPE(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.Metaspace()])
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
        tok.train_from_iterator(texts, trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        return cls(tok, context_length)

    @classmethod
    def load(cls, path: str | Path, context_length: int) -> "Tokenizer":
        """Load a ``tokenizer.json`` (ours, saved with a run, or a HF model's); a ``PolyalignError`` naming a
        missing, torn or foreign file."""
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception (missing file, invalid JSON, unknown model)
            raise PolyalignError(f"cannot read the tokenizer {path} ({e})") from None
        return cls(tok, context_length)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` atomically: a kill leaves the old file or the new one, never a torn one."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            self.tok.save(str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encs = self.tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.bool)
        return ids, mask

    def decode(self, ids) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=True)


def special_ids_of(tokenizer) -> dict[str, int]:
    """``{"[PAD]": id, ...}`` for the special tokens the tokenizer (ours: ``polyalign.tokenizer.Tokenizer``) has."""
    found = {t: tokenizer.tok.token_to_id(t) for t in SPECIALS}
    return {t: i for t, i in found.items() if i is not None}


# words a caption uses around its content (articles, prepositions, our captions' templates); the soft mask draws its
# word among the others (issue 23: Grad-CAM of "a" or "there" says nothing about the image)
FUNCTION_WORDS = ("a", "an", "the", "is", "are", "there", "of", "and", "with", "to", "in", "on", "at", "it", "its",
                  "this", "that", "some", "other", "among", "next", "by", "picture", "photo", "image", "emoji",
                  "shape", "shapes", "object", "objects", "something", "coloured", "colored", "colour", "color",
                  "number", "face")


def function_word_ids(tokenizer) -> list[int]:
    """Token ids that are not content: every piece of each of ``FUNCTION_WORDS`` as the tokenizer splits it (a word
    of several pieces, "emoji" = em ##oj ##i in WordPiece, loses all of them: another word starting "em" cannot be
    drawn either), and WordPiece continuations (``##…``): the soft mask never draws these."""
    vocab, specials = tokenizer.tok.get_vocab(), set(special_ids_of(tokenizer).values())
    ids = {i for word in FUNCTION_WORDS for i in tokenizer.tok.encode(word).ids if i not in specials}
    ids |= {i for piece, i in vocab.items() if piece.startswith("##")}
    return sorted(ids)
