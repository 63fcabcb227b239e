"""The local gRPC ranking service: real requests over a unix socket; only local addresses."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from device_helpers import TINY_RUN, item_ids, make_device, user_rows, write_csv

from fedinterest.client.ingest import ingest_file
from fedinterest.client.ranking_service import check_local_address, start_server
from fedinterest.client.recommend import recommend
from fedinterest.common import ranking_pb2, ranking_pb2_grpc
from fedinterest.common.bundle import write_bundle
from fedinterest.common.model import InterestModel, ModelConfig


def _bundle(tmp_path: Path, num_items: int, seed: int) -> bytes:
    torch.manual_seed(seed)
    config = ModelConfig(num_items=num_items, **{k: v for k, v in TINY_RUN.items() if k != "batch_size"})
    path = write_bundle(tmp_path / f"b{seed}.bundle", state_dict=InterestModel(config).state_dict(), model_config=config,
                        catalogue_ids=item_ids(num_items), model_card={"seed": seed})
    return path.read_bytes()


def test_serve_answers_over_a_unix_socket_and_follows_a_new_model(tmp_path: Path) -> None:
    device = make_device(tmp_path, num_items=30)
    seen = ["m2", "m4", "m6", "m8"]
    with device.store() as store:
        ingest_file(store, write_csv(tmp_path / "h.csv", user_rows("u1", seen)))
    socket = tmp_path / "rank.sock"
    server, bound = start_server(device.store_path, f"unix:{socket}")
    try:
        with grpc.insecure_channel(bound) as channel:
            stub = ranking_pb2_grpc.RankingStub(channel)
            # No model yet: the catalogue-order fallback (issue 16, item 7), the user's items excluded.
            fallback = stub.Recommend(ranking_pb2.RecommendRequest(k=3), timeout=30)
            assert [item.item_id for item in fallback.items] == ["m1", "m3", "m5"] and fallback.model_kind == "fallback"
            assert not stub.Status(ranking_pb2.StatusRequest(), timeout=30).has_model

            with device.store() as store:
                store.save_model("bundle", _bundle(tmp_path, 30, seed=1), {})
                expected = recommend(store, 5)
            reply = stub.Recommend(ranking_pb2.RecommendRequest(k=5), timeout=30)
            assert [item.item_id for item in reply.items] == [item for item, _ in expected.items]
            assert not {item.item_id for item in reply.items} & set(seen)
            assert reply.model_kind == "bundle" and reply.history_used == 4
            assert len(stub.Recommend(ranking_pb2.RecommendRequest(), timeout=30).items) == 10  # k defaults to 10

            # A newer model in the store is picked up without restarting the service.
            with device.store() as store:
                store.save_model("bundle", _bundle(tmp_path, 30, seed=2), {})
                newer = recommend(store, 5)
            second = stub.Recommend(ranking_pb2.RecommendRequest(k=5), timeout=30)
            assert second.model_sha256 == newer.model["sha256"] != reply.model_sha256
            status = stub.Status(ranking_pb2.StatusRequest(), timeout=30)
            assert status.has_model and status.catalogue_items == 30 and status.history_items == 4
    finally:
        server.stop(grace=None).wait()


@pytest.mark.parametrize("address", ["127.0.0.1:5000", "localhost:5000", "[::1]:5000", "unix:/tmp/x.sock", "unix:///tmp/x.sock"])
def test_local_addresses_are_accepted(address: str) -> None:
    assert check_local_address(address)


@pytest.mark.parametrize("address", ["0.0.0.0:5000", "[::]:5000", "192.168.1.4:5000", "example.org:5000", "unix:rel.sock", "127.0.0.1"])
def test_other_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="unix|loopback"):
        check_local_address(address)


def test_serve_offers_grpc_server_reflection(tmp_path: Path) -> None:
    """Issue 16, item 7: a standard gRPC client discovers and calls the service without ranking.proto."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    device = make_device(tmp_path, num_items=10)
    server, bound = start_server(device.store_path, f"unix:{tmp_path / 'r.sock'}")
    try:
        with grpc.insecure_channel(bound) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            assert "fedinterest.ranking.v1.Ranking" in database.get_services()
            pool = descriptor_pool.DescriptorPool(database)  # descriptors fetched from the server only
            method = pool.FindServiceByName("fedinterest.ranking.v1.Ranking").FindMethodByName("Recommend")
            request_class = message_factory.GetMessageClass(method.input_type)
            reply_class = message_factory.GetMessageClass(method.output_type)
            call = channel.unary_unary("/fedinterest.ranking.v1.Ranking/Recommend", request_serializer=request_class.SerializeToString,
                                       response_deserializer=reply_class.FromString)
            reply = call(request_class(k=2), timeout=30)
            assert [item.item_id for item in reply.items] == ["m1", "m2"] and reply.model_kind == "fallback"
    finally:
        server.stop(grace=1).wait()
