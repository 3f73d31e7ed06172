"""kohya's caption habits: --shuffle_caption, --keep_tokens, --keep_tokens_separator,
--caption_tag_dropout, --caption_prefix/--caption_suffix and --caption_extension. Tag arrangements are
pure functions of (seed, epoch, position), so a resumed run trains on exactly the captions the
interrupted one would have; the text-encoding cache, which holds one caption per image, is refused
with shuffled or dropped tags and encodes the fixed prefix, suffix and separator's effect once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_dataset_formats import _preflight_exit, png, txt_dataset
from toy_family import ToyFamily
from trainer_testlib import assert_toy_run_resumes_bit_identically

from lorakube_api import contract
from lorakube_trainer import caching
from lorakube_trainer.config import ConfigError, parse_config
from lorakube_trainer.data import CaptionedImages, SampleKey, arrange_tags, fixed_caption
from lorakube_trainer.dataset_layout import DatasetError, load_records
from lorakube_trainer.train import run

TAGS = "sks dog, red collar, grass, sunny, park, running, close-up, bokeh"


def _tags(caption: str) -> list[str]:
    return caption.split(", ")


def _dataset(records, **options) -> CaptionedImages:
    return CaptionedImages(records, seed=9, height=16, width=16, center_crop=False, random_flip=True,
                           samples_per_epoch=60, **options)


@pytest.fixture
def tagged(tmp_path: Path):
    return load_records(txt_dataset(tmp_path / "t", {"a.png": TAGS, "b.png": "cat, sofa, night"}))


# --- the arrangement itself ----------------------------------------------------------------------

def test_arrange_tags_keeps_the_first_tokens_and_every_tag_when_only_shuffling() -> None:
    orders = {arrange_tags(TAGS, np.random.default_rng(i), shuffle=True, keep_tokens=2) for i in range(30)}
    assert len(orders) > 20                                  # it does shuffle
    for caption in orders:
        assert _tags(caption)[:2] == ["sks dog", "red collar"]
        assert sorted(_tags(caption)) == sorted(_tags(TAGS))
    # Spacing is normalised and empty tags (a doubled or trailing comma) go.
    assert arrange_tags(" a ,b,, c ,", np.random.default_rng(0), shuffle=False, tag_dropout=0.0) == "a, b, c"
    # keep_tokens beyond the number of tags keeps them all in place.
    assert arrange_tags("a, b", np.random.default_rng(0), shuffle=True, keep_tokens=5) == "a, b"


def test_tag_dropout_drops_about_p_of_the_tags_but_never_a_kept_one() -> None:
    kept, total = 0, 0
    for i in range(400):
        caption = arrange_tags(TAGS, np.random.default_rng(i), shuffle=False, keep_tokens=1, tag_dropout=0.3)
        tags = _tags(caption)
        assert tags[0] == "sks dog"
        rest = _tags(TAGS)[1:]
        assert tags[1:] == [t for t in rest if t in tags[1:]]    # order kept without --shuffle_caption
        kept += len(tags) - 1
        total += len(rest)
    assert 0.62 < kept / total < 0.78


def test_the_keep_tokens_separator_fixes_the_head_and_a_tail_instead_of_keep_tokens() -> None:
    caption = "sks dog, red collar ||| grass, sunny, park, running ||| photo, 35mm"
    seen = set()
    for i in range(40):
        arranged = arrange_tags(caption, np.random.default_rng(i), shuffle=True, keep_tokens=1, tag_dropout=0.3,
                                keep_tokens_separator="|||")
        tags = _tags(arranged)
        assert "|||" not in arranged
        assert tags[:2] == ["sks dog", "red collar"] and tags[-2:] == ["photo", "35mm"]     # never moved or dropped
        assert set(tags[2:-2]) <= {"grass", "sunny", "park", "running"}
        seen.add(tuple(tags[2:-2]))
    assert len(seen) > 10                                     # the middle is shuffled and dropped
    # Without a second separator there is no fixed tail; without the separator, keep_tokens applies.
    assert _tags(arrange_tags("a ||| b, c", np.random.default_rng(0), shuffle=True, keep_tokens_separator="|||"))[0] == "a"
    assert arrange_tags("a, b", np.random.default_rng(0), shuffle=False, keep_tokens=1,
                        keep_tokens_separator="|||") == "a, b"
    # A caption that does not shuffle or drop is only rid of the separator; one without it is untouched.
    assert fixed_caption("a,b |||  c ||| d", keep_tokens_separator="|||") == "a, b, c, d"
    assert fixed_caption(" a ,b ", keep_tokens_separator="|||") == " a ,b "


def test_prefix_and_suffix_frame_every_caption_and_are_never_shuffled_or_dropped(tagged) -> None:
    framed = _dataset(tagged, shuffle_caption=True, caption_tag_dropout=0.4, caption_dropout=0.2,
                      caption_prefix="sks style,", caption_suffix=", high quality")
    plain = _dataset(tagged, shuffle_caption=True, caption_tag_dropout=0.4, caption_dropout=0.2)
    dropped = 0
    for position in range(60):
        key = SampleKey(0, position)
        index = framed.record_index(key)
        caption, bare = framed.caption(key, index), plain.caption(key, index)
        if framed.caption_dropped(key):
            dropped += 1
            assert caption == bare == ""             # a dropped caption is the empty one, as in kohya
            continue
        # The same arrangement of the record's own tags, framed (joined with a space, as kohya does).
        assert caption == " ".join(part for part in ("sks style,", bare, ", high quality") if part)
        assert caption.startswith("sks style, ") and caption.endswith(" , high quality")
    assert 0 < dropped < 30
    # Without tag options the caption is the record's text, framed.
    fixed = _dataset(tagged, caption_prefix="sks")
    assert fixed.caption(SampleKey(0, 0), 1) == f"sks {tagged[1].text}"


def test_the_latent_cache_encodes_the_framed_caption_under_its_own_key(tmp_path: Path, toy_model: Path) -> None:
    root = txt_dataset(tmp_path / "t", {"a.png": "dog ||| grass, park"})
    records = load_records(root)

    def cfg(*extra: str):
        return parse_config(["--model_family", "flux", "--model_path", str(toy_model), "--dataset_path", str(root),
                             "--output_path", str(tmp_path / "o"), "--height", "16", "--width", "16",
                             "--cache_latents", "--center_crop", *extra], env={})

    framed = cfg("--caption_prefix", "sks,", "--caption_suffix", ", photo", "--keep_tokens_separator", "|||")
    family = ToyFamily()
    pipe = family.load_pipeline(toy_model, torch.float32)
    caching.encode_record(family, pipe, records[0], framed, torch.device("cpu"), torch.float32)
    assert family.prompts_seen == ["sks, dog, grass, park , photo"]
    dtype = torch.float32
    keys = {caching.cache_folder(c, records, dtype) for c in (cfg(), framed, cfg("--caption_prefix", "sks,"))}
    assert len(keys) == 3                                     # a changed prefix never reuses a stale encoding


# --- per sample: deterministic, per epoch, own stream --------------------------------------------

def test_tag_order_changes_between_epochs_but_not_for_the_same_seed_and_step(tagged) -> None:
    shuffled = _dataset(tagged, shuffle_caption=True, keep_tokens=1)
    again = _dataset(tagged, shuffle_caption=True, keep_tokens=1)       # a resumed process
    by_epoch: dict[int, dict[int, list[str]]] = {0: {}, 1: {}}
    for epoch in (0, 1):
        for position in range(60):
            key = SampleKey(epoch, position)
            index = shuffled.record_index(key)
            caption = shuffled.caption(key, index)
            assert caption == again.caption(key, index)
            assert _tags(caption)[0] == _tags(tagged[index].text)[0]
            assert sorted(_tags(caption)) == sorted(_tags(tagged[index].text))
            by_epoch[epoch].setdefault(index, []).append(caption)
    dog = next(i for i, r in enumerate(tagged) if r.text == TAGS)
    # Within an epoch and between epochs the same image is shown with different tag orders.
    assert len(set(by_epoch[0][dog])) > 1
    assert set(by_epoch[0][dog]) != set(by_epoch[1][dog])
    # Another seed arranges them differently.
    other = CaptionedImages(tagged, seed=10, height=16, width=16, center_crop=False, random_flip=True,
                            samples_per_epoch=60, shuffle_caption=True, keep_tokens=1)
    keys = [SampleKey(0, p) for p in range(60)]
    assert [shuffled.caption(k, dog) for k in keys] != [other.caption(k, dog) for k in keys]


def test_tag_options_change_no_pixels_and_no_caption_dropout(tagged) -> None:
    plain = _dataset(tagged, caption_dropout=0.3)
    tagged_ds = _dataset(tagged, caption_dropout=0.3, shuffle_caption=True, caption_tag_dropout=0.2)
    for position in range(20):
        key = SampleKey(0, position)
        a, b = plain[key], tagged_ds[key]
        assert torch.equal(a["pixels"], b["pixels"]) and a["index"] == b["index"]
        assert (a["text"] == "") == (b["text"] == "")                      # the same samples dropped
    # Without the options a caption is the record's text, untouched (spacing and all).
    assert plain.caption(SampleKey(0, 0), 0) in ("", tagged[0].text)


# --- --caption_extension ---------------------------------------------------------------------------

def test_caption_extension_reads_kohya_caption_files(tmp_path: Path) -> None:
    root = tmp_path / "c"
    png(root / "a.png")
    (root / "a.caption").write_text("from the caption file")
    (root / "a.txt").write_text("from the txt file")
    assert [r.text for r in load_records(root)] == ["from the txt file"]
    assert [r.text for r in load_records(root, caption_extension=".caption")] == ["from the caption file"]
    kohya = tmp_path / "k"
    png(kohya / "3_dog" / "d.png")
    (kohya / "3_dog" / "d.caption").write_text("a dog")
    png(kohya / "3_dog" / "e.png")
    records = load_records(kohya, caption_extension=".caption")
    assert [(r.text, r.repeats) for r in records] == [("a dog", 3), ("dog", 3)]     # folder name without one
    png(tmp_path / "only" / "x.png")
    (tmp_path / "only" / "x.caption").write_text("x")
    with pytest.raises(DatasetError, match=r"^x.png: no caption file x.txt beside it .*--caption_extension "
                                           r"\(spec.dataset.captionExtension\)"):
        load_records(tmp_path / "only")
    with pytest.raises(DatasetError, match=r"^x.png: no caption file x.cap beside it .*read from .cap files"):
        load_records(tmp_path / "only", caption_extension=".cap")


def test_preflight_reads_the_caption_files_the_flag_names(tmp_path: Path, toy_model: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "c"
    png(root / "a.png")
    (root / "a.caption").write_text("a, b")
    code, err = _preflight_exit(tmp_path, toy_model, root, capsys, "--preflight")
    assert code == contract.EXIT_DATASET_ERROR
    assert "a.png: no caption file a.txt beside it" in err and "--caption_extension" in err
    code, err = _preflight_exit(tmp_path, toy_model, root, capsys, "--preflight", "--caption_extension", ".caption")
    assert code == 0, err


# --- flags and their errors -----------------------------------------------------------------------

def test_caption_tag_flags_and_their_errors(make_cfg) -> None:
    cfg = make_cfg("--shuffle_caption", "--keep_tokens", "2", "--caption_tag_dropout", "0.1",
                   "--caption_extension", ".caption", "--keep_tokens_separator", "|||", "--caption_prefix=-sks,",
                   "--caption_suffix", ", photo")
    assert (cfg.shuffle_caption, cfg.keep_tokens, cfg.caption_tag_dropout, cfg.caption_extension) == (
        True, 2, 0.1, ".caption")
    assert (cfg.keep_tokens_separator, cfg.caption_prefix, cfg.caption_suffix) == ("|||", "-sks,", ", photo")
    # Fixed text: allowed with the latent cache, and the separator needs no shuffling to be taken out.
    cached = make_cfg("--cache_latents", "--center_crop", "--caption_prefix", "sks", "--keep_tokens_separator", "#")
    assert (cached.caption_prefix, cached.keep_tokens_separator) == ("sks", "#")
    assert make_cfg("--caption_tag_dropout_rate", "0.25").caption_tag_dropout == 0.25      # kohya's spelling
    plain = make_cfg()
    assert (plain.shuffle_caption, plain.keep_tokens, plain.caption_tag_dropout, plain.caption_extension) == (
        False, 0, 0.0, ".txt")
    assert (plain.keep_tokens_separator, plain.caption_prefix, plain.caption_suffix) == ("", "", "")
    for argv, message in [
        (("--caption_tag_dropout", "1"), r"^--caption_tag_dropout: must be a probability in \[0, 1\), got 1.0"),
        (("--shuffle_caption", "--keep_tokens", "-1"), r"^--keep_tokens: must be >= 0, got -1"),
        (("--keep_tokens", "1"), r"^--keep_tokens: only matters with --shuffle_caption or --caption_tag_dropout"),
        (("--cache_latents", "--center_crop", "--shuffle_caption"),
         r"^--cache_latents: cannot be combined with --shuffle_caption: .*drop --cache_latents or --shuffle_caption"),
        (("--cache_latents", "--center_crop", "--caption_tag_dropout", "0.1"),
         r"^--cache_latents: cannot be combined with --caption_tag_dropout"),
        (("--caption_extension", "txt"), r"^--caption_extension: 'txt' is not a file ending; give one such as .txt"),
        (("--caption_extension", "../x.txt"), r"^--caption_extension: '../x.txt' is not a file ending"),
        (("--caption_extension", ".PNG"), r"^--caption_extension: .PNG is an image ending"),
        (("--keep_tokens_separator", ","), r"^--keep_tokens_separator: ',' cannot mark the fixed tags: .* is \|\|\|$"),
        (("--keep_tokens_separator", "|,|"), r"^--keep_tokens_separator: '\|,\|' cannot mark the fixed tags"),
        (("--keep_tokens_separator", "  "), r"^--keep_tokens_separator: '  ' cannot mark the fixed tags"),
    ]:
        with pytest.raises(ConfigError, match=message):
            make_cfg(*argv)


def test_yaml_config_takes_the_caption_tag_keys(tmp_path: Path, toy_model: Path) -> None:
    root = txt_dataset(tmp_path / "t", {"a.png": "x, y"})
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset_path: {root}\nshuffle_caption: true\nkeep_tokens: 1\ncaption_tag_dropout: 0.5\n"
                      "caption_extension: .caption\nkeep_tokens_separator: '|||'\ncaption_prefix: 'sks,'\n")
    cfg = parse_config(["--config", str(config), "--model_family", "flux", "--model_path", str(toy_model),
                        "--output_path", str(tmp_path / "o")], env={})
    assert (cfg.shuffle_caption, cfg.keep_tokens, cfg.caption_tag_dropout, cfg.caption_extension) == (
        True, 1, 0.5, ".caption")
    assert (cfg.keep_tokens_separator, cfg.caption_prefix) == ("|||", "sks,")


# --- exact resume with the tags shuffled and dropped ----------------------------------------------

def test_shuffled_and_dropped_tags_resume_bit_identically(tmp_path: Path, toy_model: Path) -> None:
    root = tmp_path / "d"
    png(root / "a.png", colour=(200, 30, 30))
    (root / "a.caption").write_text(TAGS)
    png(root / "b.png", colour=(30, 200, 30))
    (root / "b.caption").write_text("sks cat ||| sofa, night, lamp, window")

    def cfg(out: str):
        return parse_config(["--model_family", "flux", "--model_path", str(toy_model), "--dataset_path", str(root),
                             "--output_path", str(tmp_path / out), "--height", "16", "--width", "16", "--precision",
                             "32", "--steps_per_epoch", "3", "--max_epochs", "2", "--batch_size", "2",
                             "--checkpoint_every_n_steps", "2", "--output_formats", "diffusers",
                             "--validation_inference_steps", "1", "--shuffle_caption", "--keep_tokens", "1",
                             "--caption_tag_dropout", "0.2", "--caption_extension", ".caption",
                             "--keep_tokens_separator", "|||", "--caption_suffix", ", photo"], env={})

    whole_family = ToyFamily()
    whole = run(cfg("whole"), env={}, family=whole_family)
    dog = {p for p in whole_family.prompts_seen if p.startswith("sks dog")}
    assert len(dog) > 2                                  # several arrangements reached the model
    assert all(p.startswith(("sks dog, ", "sks cat, ")) and p.endswith(" , photo") and "|||" not in p
               for p in whole_family.prompts_seen if p.startswith("sks"))
    assert_toy_run_resumes_bit_identically(whole, cfg("whole"), cfg("cut"), crash_step=3)
