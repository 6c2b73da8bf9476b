"""deploy/ghz: the ghz configs use ghz's own keys, name calls that exist (through server reflection, as ghz resolves
them when given no proto), and carry example data that the target server accepts. ghz itself is not installed."""

from __future__ import annotations

import json
import pathlib
import re

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from splitspec_client.v1 import target_pb2, target_pb2_grpc

GHZ_DIR = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "ghz"
# (config, whether its call is a server stream)
CONFIGS = [("generate.json", False), ("generate_stream.json", True)]
# The JSON keys of ghz's runner.Config (its --config file): the long flag names.
GHZ_KEYS = {
    "proto", "protoset", "call", "cacert", "cert", "key", "skipTLS", "cname", "authority", "insecure", "total",
    "concurrency", "connections", "qps", "duration", "duration-stop", "max-duration", "timeout", "data",
    "data-file", "binary-file", "metadata", "metadata-file", "stream-interval", "output", "format",
    "connect-timeout", "keepalive", "cpus", "import-paths", "name", "tags", "reflect-metadata", "debug", "host",
    "enable-compression",
}
GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")


def load(name: str) -> dict:
    return json.loads((GHZ_DIR / name).read_text())


@pytest.mark.parametrize("name, server_streaming", CONFIGS)
def test_config_names_a_real_call_with_valid_data(name, server_streaming):
    config = load(name)
    assert set(config) <= GHZ_KEYS, f"not ghz keys: {set(config) - GHZ_KEYS}"
    assert "proto" not in config and "protoset" not in config, "ghz should use server reflection"
    assert config["insecure"] is True
    assert config["concurrency"] >= 1 and config["total"] >= config["concurrency"]
    assert all(GO_DURATION.match(config[key]) for key in ("timeout", "connect-timeout"))
    service_name, method_name = config["call"].rsplit(".", 1)
    method = target_pb2.DESCRIPTOR.pool.FindServiceByName(service_name).methods_by_name[method_name]
    assert method.server_streaming == server_streaming and not method.client_streaming
    assert method.input_type is target_pb2.GenerateRequest.DESCRIPTOR
    # Unknown fields and wrong types raise json_format.ParseError.
    request = json_format.ParseDict(config["data"], target_pb2.GenerateRequest())
    assert request.prompt and request.max_new_tokens >= 1


def test_reflection_resolves_each_call_and_its_data(target_related):
    """What ghz does without --proto: fetch the descriptors from the server, then encode the data with them."""
    with grpc.insecure_channel(target_related.address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        for name, server_streaming in CONFIGS:
            config = load(name)
            service_name, method_name = config["call"].rsplit(".", 1)
            method = pool.FindServiceByName(service_name).methods_by_name[method_name]
            assert method.server_streaming == server_streaming
            request_class = message_factory.GetMessageClass(method.input_type)
            encoded = json_format.ParseDict(config["data"], request_class()).SerializeToString()
            assert target_pb2.GenerateRequest.FromString(encoded) == json_format.ParseDict(
                config["data"], target_pb2.GenerateRequest())


def test_example_data_generates_what_it_asks_for(target_related):
    with grpc.insecure_channel(target_related.address) as channel:
        stub = target_pb2_grpc.TargetServiceStub(channel)
        unary = json_format.ParseDict(load("generate.json")["data"], target_pb2.GenerateRequest())
        response = stub.Generate(unary, timeout=60)
        assert len(response.token_ids) == unary.max_new_tokens  # ignore_eos: exactly max_new_tokens
        streamed = json_format.ParseDict(load("generate_stream.json")["data"], target_pb2.GenerateRequest())
        messages = list(stub.GenerateStream(streamed, timeout=60))
        assert sum(len(message.token_ids) for message in messages) == streamed.max_new_tokens
        assert messages[-1].finish_reason == target_pb2.FINISH_REASON_LENGTH
