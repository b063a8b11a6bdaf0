"""The nine caption settings have one home, coca.settings.SamplingParams: every other place that names them
(the service's proto, the client library, the decoder's START inputs and its config.pbtxt, the CLI) lists
exactly its fields, with its defaults where it has any."""
from __future__ import annotations

import re
from dataclasses import fields

import numpy as np

from clients.cli import SAMPLING_OPTIONS, build_parser
from clients.coca_client import Sampling
from coca.settings import SamplingParams
from search_service.pb import search_pb2 as pb
from serving.protocol import CAPTIONER, SAMPLING_INPUTS, TEXT_DECODER
from serving.repository import OPTIONAL_TEMPLATES, TEMPLATES

FIELDS = [f.name for f in fields(SamplingParams)]
TRITON_TYPES = {np.float32: "TYPE_FP32", np.int32: "TYPE_INT32", np.int64: "TYPE_INT64"}


def test_proto_and_client_library_name_exactly_the_fields():
    assert sorted(pb.SamplingSettings.DESCRIPTOR.fields_by_name) == sorted(FIELDS)
    assert all(f.has_presence for f in pb.SamplingSettings.DESCRIPTOR.fields)  # unset: the service's default
    assert sorted(f.name for f in fields(Sampling)) == sorted(FIELDS)
    assert all(getattr(Sampling(), name) is None for name in FIELDS)  # None: the service's default


def test_decoder_inputs_are_the_fields_in_config_pbtxt():
    assert sorted(SAMPLING_INPUTS) == sorted(FIELDS)
    for config, dims in [(TEMPLATES / TEXT_DECODER / "config.pbtxt", "1"),  # batched by Triton: batch dim implied
                         (OPTIONAL_TEMPLATES / CAPTIONER / "config.pbtxt", "1, 1")]:  # the same tensors, unbatched
        declared = dict(re.findall(r'\{ name: "(\w+)" data_type: (TYPE_\w+) dims: \[ %s \] optional: true \}' % dims,
                                   config.read_text()))
        assert declared == {name: TRITON_TYPES[dtype] for name, dtype in SAMPLING_INPUTS.values()}, config


def test_cli_options_are_the_fields_with_their_defaults():
    assert sorted(SAMPLING_OPTIONS) == sorted(FIELDS)
    args = build_parser().parse_args(["caption", "photo.jpg"])
    defaults = SamplingParams()
    assert {name: getattr(args, name) for name in FIELDS if name != "seed"} == \
           {name: getattr(defaults, name) for name in FIELDS if name != "seed"}
    args = build_parser().parse_args(["caption", "photo.jpg", "--beams", "4", "--beam-groups", "2", "--top-k", "7"])
    assert (args.num_beams, args.num_beam_groups, args.top_k) == (4, 2, 7)
