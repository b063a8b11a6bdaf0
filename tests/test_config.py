"""coca.config: the typed shape of a CoCa net, read from open_clip's configs (by name or JSON file)."""
import json

import pytest

from coca.config import CocaConfig, DecoderConfig, VisionConfig
from coca.errors import UnknownModelError
from coca.loading import CONFIG_DIR, model_config


def test_by_name_and_from_json_agree():
    assert CocaConfig.from_json(CONFIG_DIR / "coca-tiny.json") == model_config("coca-tiny")


def test_b32_shape_and_defaults_for_keys_open_clip_leaves_out():
    cfg = model_config("coca_ViT-B-32")
    assert cfg.embed_dim == 512
    assert cfg.vision == VisionConfig(image_size=224, patch_size=32, width=768, layers=12)  # head_width 64, 256 queries
    assert (cfg.vision.heads, cfg.vision.grid, cfg.vision.image_tokens) == (12, 7, 255)
    assert cfg.decoder == DecoderConfig(context_length=76, vocab_size=49408, width=512, heads=8, layers=12)
    assert (cfg.text.context_length, cfg.text.correct_cls_mask) == (76, False)


def test_a_missing_required_key_or_an_unknown_name_is_refused(tmp_path):
    raw = json.loads((CONFIG_DIR / "coca-tiny.json").read_text())
    del raw["vision_cfg"]["width"]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(TypeError, match="width"):
        CocaConfig.from_json(tmp_path / "bad.json")
    with pytest.raises(UnknownModelError, match="coca_ViT-B-32"):
        model_config("coca_ViT-Z-99")
