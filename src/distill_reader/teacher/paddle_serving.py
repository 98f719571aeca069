"""Reads a Paddle Serving client config (``serving_client_conf.prototxt``) for its alias names.

The seed's ``serving_conf_file`` names the served tensors (``name``) and the names the reader's
config uses (``alias_name``). The message types are declared here at run time from Paddle Serving's
``general_model_config.proto`` so the protobuf text-format parser does the parsing.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from distill_reader.errors import ConfigError


@cache
def _general_model_config_class() -> type:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="distill_reader_general_model_config.proto", package="distill_reader.paddle_serving"
    )
    for var in ("FeedVar", "FetchVar"):
        msg = fdp.message_type.add(name=var)
        label_opt = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
        label_rep = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
        types = descriptor_pb2.FieldDescriptorProto
        for number, (name, ftype, label) in enumerate(
            [
                ("name", types.TYPE_STRING, label_opt),
                ("alias_name", types.TYPE_STRING, label_opt),
                ("is_lod_tensor", types.TYPE_BOOL, label_opt),
                ("feed_type" if var == "FeedVar" else "fetch_type", types.TYPE_INT32, label_opt),
                ("shape", types.TYPE_INT32, label_rep),
            ],
            start=1,
        ):
            msg.field.add(name=name, number=number, type=ftype, label=label)
    top = fdp.message_type.add(name="GeneralModelConfig")
    for number, (name, type_name) in enumerate([("feed_var", "FeedVar"), ("fetch_var", "FetchVar")], start=1):
        top.field.add(
            name=name,
            number=number,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
            type_name=f".distill_reader.paddle_serving.{type_name}",
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("distill_reader.paddle_serving.GeneralModelConfig")
    )


def load_alias_map(path: Path) -> dict[str, str]:
    """``alias_name -> name`` for every feed and fetch var of a Paddle Serving client config."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"[conf] serving_conf_file: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    config = _general_model_config_class()()
    try:
        text_format.Parse(text, config, allow_unknown_field=True)
    except text_format.ParseError as exc:
        raise ConfigError(f"[conf] serving_conf_file: {path}: {exc}") from None
    return {v.alias_name or v.name: v.name for v in [*config.feed_var, *config.fetch_var] if v.name}
