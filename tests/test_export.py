"""`coca export`: a Triton model repository with each part's weights, its identity, loadable part by part."""
import json
import re
import shutil

import pytest
import torch

from coca.errors import WeightsUnavailableError
from coca.loading import PARTS, file_sha256, load_part, part_state_dict
from serving.protocol import TRITON_MODELS, WEIGHTS_FILE, Identity
from serving.repository import MANIFEST_FILE, TEMPLATES, DecoderSettings, config_parameters, export_repository
from serving.models.sequences import SequenceTable


def test_export_writes_configs_weights_and_identity(tiny_coca, tmp_path):
    manifest = json.loads(export_repository(tiny_coca, tmp_path, decoder=DecoderSettings(capacity_rows=8, sequence_idle_s=4)).read_text())
    assert (manifest["model"], manifest["pretrained"], manifest["dtype"], manifest["embed_dim"]) == ("coca-tiny", "random", "float32", 64)
    identities = set()
    for name, part in TRITON_MODELS.items():
        folder = tmp_path / name
        assert (folder / "1" / "model.py").read_text() == (TEMPLATES / name / "1" / "model.py").read_text()
        assert manifest["models"][name]["sha256"] == file_sha256(folder / "1" / WEIGHTS_FILE)
        config = (folder / "config.pbtxt").read_text()
        params = config_parameters(config)
        assert params["coca_weights_sha256"] == manifest["models"][name]["sha256"]
        assert json.loads(params["coca_preprocess"]) == json.loads(json.dumps(tiny_coca.preprocess_cfg))
        identities.add(Identity.from_parameters(params))
    assert identities == {Identity("coca-tiny", "random", "float32", 64, manifest["repository_id"])}
    image_config = (tmp_path / "coca_image_encoder" / "config.pbtxt").read_text()
    assert re.search(r'"IMAGE_EMBEDDINGS" data_type: TYPE_FP32 dims: \[ 255, 64 \]', image_config)
    assert re.search(r'"ATTENTION" data_type: TYPE_FP32 dims: \[ 3, 50, 50 \]', image_config)
    decoder_params = config_parameters((tmp_path / "coca_text_decoder" / "config.pbtxt").read_text())
    assert (decoder_params["capacity_rows"], decoder_params["sequence_ttl_seconds"]) == ("8", "4.8")
    assert "max_sequence_idle_microseconds: 4000000" in (tmp_path / "coca_text_decoder" / "config.pbtxt").read_text()

    assert not (tmp_path / "coca_captioner").exists()  # only with --decoder-scheduler iterative


def test_an_iterative_export_adds_the_captioner_on_the_decoders_weights(tiny_coca, tmp_path):
    from serving.protocol import CAPTIONER, TEXT_DECODER

    export_repository(tiny_coca, tmp_path, decoder=DecoderSettings(capacity_rows=8, scheduler="iterative"))
    weights = [tmp_path / name / "1" / WEIGHTS_FILE for name in (TEXT_DECODER, CAPTIONER)]
    assert weights[0].stat().st_ino == weights[1].stat().st_ino  # one file on disk (a hard link)
    config = (tmp_path / CAPTIONER / "config.pbtxt").read_text()
    params = config_parameters(config)
    assert params["coca_weights_sha256"] == file_sha256(weights[0]) and params["capacity_rows"] == "8"
    assert Identity.from_parameters(params) == Identity.from_parameters(
        config_parameters((tmp_path / TEXT_DECODER / "config.pbtxt").read_text()))
    assert re.search(r'"IMAGE_EMBEDDINGS" data_type: TYPE_FP32 dims: \[ 1, -1, 64 \]', config)
    assert "sequence_ttl_seconds" not in params and "decoupled: true" in config
    export_repository(tiny_coca, tmp_path)  # exported again without it: clients must not find a stale one
    assert not (tmp_path / CAPTIONER).exists()
    with pytest.raises(Exception, match="unknown decoder scheduler 'eager'"):
        DecoderSettings(scheduler="eager")


def test_export_in_place_keeps_model_py_and_is_idempotent(tiny_coca, tmp_path):
    templates = tmp_path / "model_repository"
    shutil.copytree(TEMPLATES, templates, ignore=shutil.ignore_patterns("*.safetensors", "__pycache__"))
    model_py = {name: (templates / name / "1" / "model.py").read_text() for name in TRITON_MODELS}
    export_repository(tiny_coca, templates, templates=templates)
    first = {name: (templates / name / "config.pbtxt").read_text() for name in TRITON_MODELS}
    export_repository(tiny_coca, templates, templates=templates)  # configs now hold values: rewritten, not duplicated
    assert {name: (templates / name / "config.pbtxt").read_text() for name in TRITON_MODELS} == first
    assert {name: (templates / name / "1" / "model.py").read_text() for name in TRITON_MODELS} == model_py
    assert all(config.count('key: "coca_model"') == 1 for config in first.values())


def test_each_part_loads_alone_and_equals_the_whole(tiny_coca, tmp_path):
    export_repository(tiny_coca, tmp_path, dtype="bfloat16")
    for name, part in TRITON_MODELS.items():
        net = load_part("coca-tiny", part, tmp_path / name / "1" / WEIGHTS_FILE)
        loaded = {k: v for k, v in net.state_dict().items() if not v.is_meta}
        assert set(loaded) == set(part_state_dict(tiny_coca.net, part))  # nothing else is materialised
        assert all(torch.equal(v, part_state_dict(tiny_coca.net, part)[k].bfloat16()) for k, v in loaded.items())
        assert net.dtype == torch.bfloat16 and net.device.type == "cpu"
    assert set(PARTS) == set(TRITON_MODELS.values())


def test_weights_of_another_part_are_refused(tmp_path, tiny_coca):
    export_repository(tiny_coca, tmp_path)
    with pytest.raises(WeightsUnavailableError, match="does not hold the coca-tiny text_decoder: .* missing"):
        load_part("coca-tiny", "text_decoder", tmp_path / "coca_text_encoder" / "1" / WEIGHTS_FILE)
    with pytest.raises(WeightsUnavailableError, match="cannot read"):
        load_part("coca-tiny", "text_encoder", tmp_path / "missing.safetensors")


def test_cli_export_defaults_to_onnx_encoders_and_the_captioner_and_keeps_the_old_paths(tmp_path, capsys):
    from clients.cli import main
    from serving.protocol import CAPTIONER, IMAGE_ENCODER, ONNX_FILE, TEXT_ENCODER

    def export(out, *flags):  # fixed: auto measures candidates on a VNNI machine (~13 s), not what this is about
        assert main(["export", "--model", "coca-tiny", "--pretrained", "random", "--out", str(out),
                     "--precision", "fixed", *flags]) == 0
        runtimes = {config_parameters((out / name / "config.pbtxt").read_text())["runtime"]
                    for name in (IMAGE_ENCODER, TEXT_ENCODER)}
        return runtimes, (out / IMAGE_ENCODER / "1" / ONNX_FILE).is_file(), (out / CAPTIONER).is_dir()

    assert export(tmp_path / "repo") == ({"onnxruntime"}, True, True)
    assert (tmp_path / "repo" / MANIFEST_FILE).is_file() and "coca-tiny" in capsys.readouterr().out
    assert export(tmp_path / "old", "--format", "python", "--decoder-scheduler", "sequence") == ({"torch"}, False, False)


def test_cli_triton_refuses_a_repository_that_was_not_exported(tmp_path, capsys):
    from clients.cli import main

    assert main(["triton", "--model-repository", str(tmp_path)]) == 2
    assert "run `coca export --out" in capsys.readouterr().err


def test_sequence_table_expires_least_recently_used_first():
    table = SequenceTable(ttl_s=10)
    table.add("a", 1, now=0)
    table.add("b", 2, now=5)
    assert table.touch("a", now=8) == 1  # a is fresh again
    assert table.pop_idle(now=16) == [("b", 2)]
    assert (len(table), table.touch("missing", now=16), table.pop("a"), len(table)) == (1, None, 1, 0)


def test_a_reused_repository_is_exported_again_when_a_config_template_changed(tmp_path, capsys):
    from serving.repository import EncoderSettings, MARKER, ensure_repository

    def ensure():
        capsys.readouterr()
        ensure_repository(tmp_path / "repo", "coca-tiny", "random", 0, encoders=EncoderSettings("torch"))
        return "exporting" in capsys.readouterr().out

    config = tmp_path / "repo" / "coca_text_encoder" / "config.pbtxt"
    assert ensure() and not ensure()  # exported once, then reused as it is
    config.write_text(config.read_text() + "# edited\n")
    marker = tmp_path / f"repo.{MARKER}"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "templates": "of an older checkout"}))
    assert ensure()  # the templates it was exported from are not today's: exported again, from today's
    assert "# edited" not in config.read_text() and not ensure()
