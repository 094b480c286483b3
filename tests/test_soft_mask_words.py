"""Issue 23: the soft mask draws its word among content words — never an article, a template word, a special token
or a WordPiece continuation — with our BPE tokenizer and with MiniLM's WordPiece."""
import torch

from polyalign.config.checks import resolve_hf_path
from polyalign.models.heads.gradcam import pick_words
from polyalign.tokenizer import Tokenizer, function_word_ids, special_ids_of

CAPTIONS = ["a small red star at the top left", "there is a green circle", "a picture of a blue heart",
            "an emoji of a cat face", "something yellow next to a purple ring"]
CONTENT = {"small", "red", "star", "top", "left", "green", "circle", "blue", "heart", "cat", "yellow", "purple",
           "ring"}


def _drawn(tok) -> set[str]:
    ids, mask = tok(CAPTIONS)
    exclude = sorted(set(special_ids_of(tok).values()) | set(function_word_ids(tok)))
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([pick_words(ids, mask, exclude, g) for _ in range(300)])  # (300, B)
    words = set()
    for row in range(ids.shape[0]):
        for k in picks[:, row].unique().tolist():
            words.add(tok.decode([int(ids[row, k])]).strip().lstrip("Ġ"))
    return words


def test_bpe_draws_content_words_only():
    tok = Tokenizer.train(CAPTIONS * 20, vocab_size=200, context_length=16)
    words = _drawn(tok)
    assert words and words <= CONTENT | {w for c in CONTENT for w in [c[:k] for k in range(1, len(c))]}
    assert not words & {"a", "an", "the", "there", "is", "of", "picture", "emoji", "something", "next", "at", "to"}


def test_wordpiece_draws_content_words_only():
    tok = Tokenizer.load(resolve_hf_path("minilm") / "tokenizer.json", 16)
    words = _drawn(tok)
    assert words <= CONTENT, words - CONTENT
    assert len(words) >= 10  # every caption's content words get drawn
