"""Parity of sdlite's CLIP tokenizer with transformers' CLIPTokenizer, plus SD v1 behaviour.

The reference is `transformers.CLIPTokenizer` (a Rust "fast" tokenizer in transformers 5) built
offline from the very vocabulary file sdlite ships. The two do not clean text the same way:

* OpenAI's tokenizer (which sdlite follows) runs ``ftfy.fix_text``, HTML-unescapes twice, strips,
  collapses whitespace and lowercases.
* The fast tokenizer only normalizes: NFC, whitespace runs -> one space, per-character lowercase.

So on raw text the two differ wherever ftfy or the unescaping changes something (HTML entities,
curly quotes, fullwidth letters, ligatures, mojibake, control characters) and where
per-character lowercasing differs from Python's (Greek final sigma). Given OpenAI-cleaned text
they agree, except for the few cases pinned down in `test_differences_that_survive_cleaning`.
The differences on raw text are the behaviour of the original SD environment, whose prompts went
through ftfy; they are kept on purpose and documented in `test_documented_raw_text_differences`.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import random
import unicodedata
from importlib import resources

import ftfy
import pytest
import regex
import torch

from sdlite.errors import InputError
from sdlite.tokenizer import CLIPTokenizer, TokenizedText, get_tokenizer

BOS, EOS = 49406, 49407
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
ASTRONAUT = "a photograph of an astronaut riding a horse"
# From DESIGN.md (computed with OpenAI's CLIP), not from sdlite.
ASTRONAUT_IDS = [BOS, 320, 8853, 539, 550, 18376, 6765, 320, 4558, EOS]
# OpenAI's pre-tokenization pattern, used here to explain the differences that survive cleaning.
OPENAI_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


# --------------------------------------------------------------------------- corpus

HAND_WRITTEN = [
    # plain English SD prompts
    ASTRONAUT,
    "a beautiful landscape painting of mountains at sunset, oil on canvas",
    "portrait of a young woman with red hair, studio lighting, 85mm lens",
    "a cute corgi wearing a tiny hat, digital art",
    "cyberpunk city street at night with neon signs and rain",
    "an isometric render of a cozy cabin in the woods",
    "the quick brown fox jumps over the lazy dog",
    "a bowl of ramen, food photography, top down view",
    "an old lighthouse on a cliff during a storm",
    "a watercolor of cherry blossoms by a river",
    "it's a dog's life, isn't it? they're here, we've won, i'm fine, you'll see, he'd go",
    # punctuation-heavy, weighting syntax
    "masterpiece, (best quality:1.2), [cat|dog]",
    "((highly detailed)), [[blurry]], {{sharp}}, (((masterpiece)))",
    "a (red:1.5) car AND a (blue:0.8) boat",
    "<lora:add_detail:0.7> portrait, <hypernet:anime:1>",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit",
    "!!!???...,,,;;;:::---___===+++***",
    "photo -- style raw --ar 16:9 --v 5",
    "he said \"hello\" and 'goodbye'",
    "a/b\\c|d~e`f^g@h#i$j%k&l*m",
    "(masterpiece:1.3), (best quality:1.2), 1girl, solo, looking at viewer",
    "email me at someone@example.com or visit https://example.com/path?q=1&x=2",
    # numbers
    "1920x1080 wallpaper, 4k, 8k uhd",
    "pi is 3.14159 and e is 2.71828",
    "the year 2024, 100% real, -5 degrees, 1,000,000 stars",
    "seed 1234567890 steps 50 cfg 7.5",
    "²³ ½ ① Ⅻ ١٢٣ ४२",
    # accented Latin and other scripts
    "café au lait in a naïve style",
    "Ærøskøbing harbour in winter",
    "crème brûlée, piñata, façade, São Paulo, Zürich, Kraków",
    "straße in München, Größe XXL",
    "Ελληνικά γράμματα και ΟΔΟΣ ΣΟΦΟΣ",
    "Москва, Красная площадь ночью",
    "שלום עולם and مرحبا بالعالم",
    "İstanbul, Iğdır, ıslak",
    "tiếng việt có dấu",
    # CJK
    "富士山と桜、浮世絵風",
    "一只可爱的猫, 高清",
    "한국어 프롬프트 테스트",
    "mixed 日本語 and english words",
    "ｶﾀｶﾅ halfwidth katakana",
    # emoji, including ZWJ sequences, flags, skin tones, variation selectors
    "a happy dog 🐶 with a ball ⚽",
    "👩\u200d💻 coding at night 🌙",
    "family 👨\u200d👩\u200d👧\u200d👦 picnic",
    "🏳️\u200d🌈 pride flag and 🇯🇵 flag",
    "thumbs up 👍🏽 and ❤️ heart",
    "🔥🔥🔥 fire",
    # HTML entities
    "salt &amp; pepper",
    "i &lt;3 cats",
    "&amp;amp; double escaped",
    "&quot;quoted&quot; and &#39;apos&#39;",
    "caf&eacute; &copy; 2024 &mdash; all rights",
    "<lora:style:0.8> caf&eacute; sign that reads &amp;amp; &lt;3",  # '<': ftfy leaves entities
    "<b>bold</b> &amp;lt;tag&amp;gt;",
    "&#x1F600; smile &#128512;",
    "non&nbsp;breaking&nbsp;space",
    # mojibake
    "cafÃ© crÃ¨me",
    "donâ€™t stop",
    "Ã¼ber cool",
    # curly quotes and typographic punctuation
    "“curly quotes” and ‘single ones’",
    "it’s the dog’s ball",
    "an em—dash and an en–dash… ellipsis",
    # fullwidth letters and ligatures
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ ａｎｄ １２３",
    "ﬁne ﬂowers in the ﬀ oﬃce",
    "ǅemal and ǈubljana",
    # whitespace
    "  leading and trailing spaces  ",
    "many     spaces    between   words",
    "tabs\tbetween\twords",
    "new\nlines\nhere",
    "windows\r\nline endings\r\n",
    "mixed \t\n  whitespace \u00a0 and\u3000ideographic",
    "line\u2028separator and paragraph\u2029separator",
    # mixed case
    "A PHOTOGRAPH OF AN ASTRONAUT RIDING A HORSE",
    "A Photograph Of An Astronaut Riding A Horse",
    "a PhOtOgRaPh oF aN aStRoNaUt",
    "DON'T STOP, IT'S FINE, WE'RE HERE",
    # empty and whitespace-only
    "",
    " ",
    "\t\n  \r\n",
    # control characters, zero-width characters
    "zero\u200bwidth\u200cjoiner\u200dtest",
    "bom\ufeffinside",
    "bell\x07 and escape\x1b[31m red",
    "file\x1cseparator",
    "soft\u00adhyphen",
    "combining e\u0301 and a\u0308 marks",
    # the special tokens written literally
    "a cat <|endoftext|> a dog",
    "<|endoftext|>",
    "cat<|endoftext|>dog",
    "<|startoftext|> hello world",
    "<|startoftext|><|endoftext|><|endoftext|>",
    # longer than 77 tokens
    " ".join(["a very detailed painting of a castle on a hill"] * 12),
    ", ".join(f"tag{i}" for i in range(60)),
    "masterpiece, best quality, " * 30,
]

SUBJECTS = [
    "a cat", "an astronaut", "a red fox", "a medieval knight", "a robot", "a dragon",
    "a lighthouse", "a bowl of fruit", "an old man", "a sailing ship", "a forest spirit",
    "a vintage car", "a mountain village", "a jellyfish", "a samurai", "a teapot",
]
STYLES = [
    "oil painting", "digital art", "photorealistic", "studio ghibli style", "watercolor",
    "concept art", "8k uhd", "trending on artstation", "35mm film", "pixel art", "ukiyo-e",
    "unreal engine 5", "isometric", "by greg rutkowski", "low poly", "charcoal sketch",
]
EXTRAS = [
    "(best quality:1.2)", "[blurry]", "((sharp focus))", "1920x1080", "f/1.8", "3.14159",
    "café", "naïve", "Ærø", "富士山", "猫", "🐱", "👩\u200d🚀", "&amp;", "&lt;3", "cafÃ©",
    "“quoted”", "it’s", "ＡＢＣ", "ﬁ", "ΟΔΟΣ", " <|endoftext|> ", "don't", "we'll", "x2.5",
    "#hashtag", "@user", "50%", "v1.5", "--no text", "😀😀", "é\u0301", "Ⅳ", "½",
]
SEPARATORS = [", ", " ", ",", " | ", "  ", "\t", "\n", ". ", "; ", " - "]


def _case(rng: random.Random, text: str) -> str:
    return rng.choice([str, str, str, str.upper, str.title, str.swapcase])(text)


def _generated_prompts(count: int, seed: int = 20240601) -> list[str]:
    """Deterministic SD-style prompts mixing subjects, styles, weights, scripts and whitespace."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        parts = [_case(rng, rng.choice(SUBJECTS))]
        parts += rng.sample(STYLES, rng.randint(1, 4)) + rng.sample(EXTRAS, rng.randint(0, 3))
        rng.shuffle(parts)
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(SEPARATORS) + part
        if rng.random() < 0.1:
            text = text * rng.randint(4, 8)  # long prompts that need truncation
        prompts.append(text)
    return prompts


CORPUS = HAND_WRITTEN + _generated_prompts(260)


def _openai_clean(text: str) -> str:
    """OpenAI's cleaning as specified: ftfy, unescape twice, strip, collapse whitespace, lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def _fast_normalize(text: str) -> str:
    """What the fast tokenizer's normalizer does: NFC, whitespace runs -> " ", per-char lowercase.

    Leading and trailing spaces are stripped as well: the fast pre-tokenizer drops them.
    """
    text = regex.sub(r"\p{White_Space}+", " ", unicodedata.normalize("NFC", text))
    return "".join(char.lower() for char in text).strip(" ")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return get_tokenizer()


def _shipped_vocab_bytes() -> bytes:
    return (resources.files("sdlite") / "data" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()


@pytest.fixture(scope="module")
def vocab_lines() -> list[str]:
    return gzip.decompress(_shipped_vocab_bytes()).decode("utf-8").split("\n")


@pytest.fixture(scope="module")
def ref(tmp_path_factory, vocab_lines):
    """transformers' CLIPTokenizer built offline from the shipped vocabulary."""
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Files in the layout of Hugging Face's CLIP repos, built the way OpenAI's code builds its
    # vocabulary: byte symbols, the same with "</w>", the merges used, then the two specials.
    merges = vocab_lines[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    # In transformers 5, CLIPTokenizer(vocab_file=..., merges_file=...) silently ignores both
    # files and builds a 3-token vocabulary; from_pretrained on the folder reads them.
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert len(reference) == 49408, "reference tokenizer did not load the vocabulary"
    assert reference(ASTRONAUT)["input_ids"] == ASTRONAUT_IDS, "reference tokenizer is broken"
    # SD v1 pads with EOS. transformers 5 defaults CLIP's pad token to <|endoftext|> already;
    # set it anyway so both sides pad with EOS whatever the default becomes.
    reference.pad_token = "<|endoftext|>"
    assert reference.pad_token_id == EOS
    return reference


def _ref_ids(ref, text: str) -> list[int]:
    """Reference ids, padded and truncated the SD v1 way."""
    return ref(text, padding="max_length", max_length=77, truncation=True)["input_ids"]


def _mismatches(pairs) -> list[str]:
    return [f"{prompt!r}: sdlite {ours} != reference {theirs}" for prompt, ours, theirs in pairs
            if ours != theirs]


# --------------------------------------------------------------------------- parity


def test_corpus_is_broad():
    assert len(CORPUS) >= 300
    assert len(set(CORPUS)) >= 290
    assert "" in CORPUS and any(len(p) > 400 for p in CORPUS)


def test_clean_matches_openai(tok):
    bad = [p for p in CORPUS if tok.clean(p) != _openai_clean(p)]
    assert not bad, f"{len(bad)} prompts cleaned differently, e.g. {bad[:3]!r}"
    assert tok.clean("<i>salt &amp;amp; pepper</i>") == "<i>salt & pepper</i>"  # 2 unescapes


def test_parity_on_cleaned_text(tok, ref):
    """sdlite(raw prompt) == reference(OpenAI-cleaned prompt), for every prompt of the corpus."""
    pairs = [(p, tok.tokenize(p).ids, _ref_ids(ref, _openai_clean(p))) for p in CORPUS]
    bad = _mismatches(pairs)
    assert not bad, f"{len(bad)} of {len(CORPUS)} prompts differ:\n" + "\n".join(bad[:10])


def test_parity_on_raw_text_where_cleaning_agrees(tok, ref):
    """Where OpenAI's cleaning does nothing beyond the fast normalizer, raw text gives equal ids."""
    subset = [p for p in CORPUS if tok.clean(p) == _fast_normalize(p)]
    assert len(subset) >= 200, f"only {len(subset)} prompts left: the test would say little"
    pairs = [(p, tok.tokenize(p).ids, _ref_ids(ref, p)) for p in subset]
    bad = _mismatches(pairs)
    assert not bad, f"{len(bad)} of {len(subset)} prompts differ:\n" + "\n".join(bad[:10])


@pytest.mark.parametrize("prompt", [
    "salt &amp; pepper",  # HTML entity: unescaped by OpenAI only
    "“curly quotes” and it’s",  # ftfy straightens quotes
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ",  # ftfy folds fullwidth forms
    "ﬁne ﬂowers",  # ftfy expands Latin ligatures
    "cafÃ© crÃ¨me",  # ftfy repairs mojibake
    "ΟΔΟΣ ΣΟΦΟΣ",  # Python lowercases a final sigma to ς, the fast normalizer to σ
    "<|ENDOFTEXT|>",  # OpenAI lowercases first; the fast tokenizer matches specials as written
])
def test_documented_raw_text_differences(tok, ref, prompt):
    """On these raw prompts sdlite (= OpenAI) and the fast tokenizer differ; cleaning reconciles.

    Stable Diffusion v1 was trained and run with prompts cleaned by ftfy, so sdlite keeps the
    OpenAI behaviour.
    """
    ours = tok.tokenize(prompt).ids
    assert ours != _ref_ids(ref, prompt)
    assert ours == _ref_ids(ref, tok.clean(prompt))


def test_differences_that_survive_cleaning(tok, ref):
    """Three corner cases where sdlite follows OpenAI and the fast tokenizer does not.

    Excluded from the corpus on purpose; each cause is shown with OpenAI's own pattern.
    """
    # 1. U+0345 (a combining mark) case-folds to a letter, so the case-insensitive pattern
    #    matches it with neither [\p{L}]+ nor [^\s\p{L}\p{N}]+: OpenAI drops it.
    text = "x\u0345y"
    assert OPENAI_PATTERN.findall(tok.clean(text)) == ["x", "y"]
    assert tok.encode(text) == tok.encode("x y")
    assert tok.tokenize(text).ids != _ref_ids(ref, tok.clean(text))
    # 2. A special token glued after punctuation is eaten by the punctuation run, so OpenAI
    #    does not see it; the fast tokenizer extracts special tokens before pre-tokenizing.
    text = "cat!<|endoftext|>"
    assert OPENAI_PATTERN.findall(text) == ["cat", "!<|", "endoftext", "|>"]
    assert EOS not in tok.encode(text)
    assert EOS in _ref_ids(ref, tok.clean(text))[1:-1]
    # 3. ftfy normalizes to NFC *before* the HTML unescaping, and skips unescaping when the text
    #    holds a '<': an entity for a combining accent then stays decomposed (and the accent,
    #    not a letter, becomes a word of its own). The fast tokenizer composes it again (NFC).
    text = "1 < 2 e&#769;"
    cleaned = tok.clean(text)
    assert cleaned == "1 < 2 e\u0301" and not unicodedata.is_normalized("NFC", cleaned)
    assert OPENAI_PATTERN.findall(cleaned) == ["1", "<", "2", "e", "\u0301"]
    assert tok.decode(tok.encode(text)).split() == ["1", "<", "2", "e", "\u0301"]
    assert tok.tokenize(text).ids != _ref_ids(ref, cleaned)
    assert tok.tokenize(unicodedata.normalize("NFC", cleaned)).ids == _ref_ids(ref, cleaned)


# --------------------------------------------------------------------------- SD v1 layout


def test_astronaut_golden(tok):
    result = tok.tokenize(ASTRONAUT)
    assert isinstance(result, TokenizedText)
    assert result.ids == ASTRONAUT_IDS + [EOS] * 67
    assert result.num_truncated == 0
    assert tok.encode(ASTRONAUT) == ASTRONAUT_IDS[1:-1]
    assert tok.BOS == BOS and tok.EOS == EOS and len(tok) == 49408


def test_bos_eos_and_padding(tok):
    ids = tok.tokenize("a red cat").ids
    assert len(ids) == 77 and ids[0] == BOS
    assert ids.count(BOS) == 1
    assert ids[4:] == [EOS] * 73 and EOS not in ids[:4]
    assert tok.tokenize("").ids == [BOS] + [EOS] * 76
    assert tok.tokenize("   \t\n").ids == [BOS] + [EOS] * 76
    short = tok.tokenize("a red cat", length=8).ids
    assert short == [BOS, *tok.encode("a red cat"), EOS, EOS, EOS, EOS]


def test_truncation_of_a_long_prompt(tok):
    rng = random.Random(7)
    words = ["castle", "dragon", "forest", "glowing", "ancient", "river", "storm", "tower"]
    text = " ".join(rng.choice(words) for _ in range(200))
    tokens = tok.encode(text)
    result = tok.tokenize(text)
    assert len(tokens) > 75
    assert len(result.ids) == 77 and result.ids[0] == BOS and result.ids[76] == EOS
    assert result.ids[1:76] == tokens[:75]
    assert result.num_truncated == len(tokens) - 75


def test_exactly_75_tokens_is_not_truncated(tok):
    text = " ".join(["cat"] * 75)
    assert len(tok.encode(text)) == 75
    result = tok.tokenize(text)
    assert result.num_truncated == 0
    assert result.ids == [BOS] + tok.encode(text) + [EOS]
    assert tok.tokenize(text + " cat").num_truncated == 1


def test_call_returns_batch_tensor(tok):
    single = tok("a red cat")
    assert single.dtype == torch.long and single.shape == (1, 77)
    assert single[0].tolist() == tok.tokenize("a red cat").ids
    batch = tok(["a red cat", "", ASTRONAUT], length=20)
    assert batch.shape == (3, 20)
    assert batch[2, :10].tolist() == ASTRONAUT_IDS
    assert tok([]).shape == (0, 77)


def test_invalid_inputs_raise_input_error(tok, tmp_path):
    with pytest.raises(InputError):
        tok.tokenize("cat", length=1)
    with pytest.raises(InputError):
        tok.encode(None)
    with pytest.raises(InputError):
        tok.decode([49408])
    with pytest.raises(InputError):
        tok.decode([-1])
    with pytest.raises(InputError):
        CLIPTokenizer(tmp_path / "missing.txt.gz")
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(gzip.compress(b"#version\nonly one line\n"))
    with pytest.raises(InputError):
        CLIPTokenizer(broken)


# --------------------------------------------------------------------------- decode, cache, file


def test_decode_round_trip_plain_ascii(tok):
    plain = [p for p in CORPUS if regex.fullmatch(r"[a-z]+( [a-z]+)*", p)]
    assert len(plain) >= 5
    for prompt in plain:
        assert tok.decode(tok.encode(prompt)) == prompt + " "  # every word ends with "</w>"
    punctuated = "a cat, (best quality:1.2) it's 8k!"
    assert tok.decode(tok.encode(punctuated)).split() == OPENAI_PATTERN.findall(punctuated)
    assert tok.decode([BOS, EOS]) == "<|startoftext|><|endoftext|>"
    assert tok.decode(torch.tensor(ASTRONAUT_IDS[1:-1])) == ASTRONAUT + " "


def test_bpe_cache_is_bounded(monkeypatch):
    import sdlite.tokenizer as module

    fresh = CLIPTokenizer()
    expected = [fresh.encode(p) for p in CORPUS[:40]]
    monkeypatch.setattr(module, "CACHE_LIMIT", 5)
    small = CLIPTokenizer()
    assert [small.encode(p) for p in CORPUS[:40]] == expected
    assert len(small._cache) <= 5


def test_shared_instance_and_explicit_path(tok, tmp_path, vocab_lines):
    assert get_tokenizer() is get_tokenizer()
    copy = tmp_path / "vocab.txt.gz"
    copy.write_bytes(gzip.compress("\n".join(vocab_lines).encode("utf-8")))
    assert CLIPTokenizer(copy).tokenize(ASTRONAUT) == tok.tokenize(ASTRONAUT)


def test_shipped_vocab_checksum():
    assert hashlib.sha256(_shipped_vocab_bytes()).hexdigest() == VOCAB_SHA256
