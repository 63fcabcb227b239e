"""Hostile requests to the local ranking service (issue 5, part 4), over a real unix socket.

Any `k` and any request bytes get either a valid answer or a proper gRPC status; the
service stays up and answers a good request afterwards, and the store is unchanged.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from device_helpers import TINY_RUN, item_ids, make_device, user_rows, write_csv
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from fedinterest.client.ingest import ingest_file
from fedinterest.client.ranking_service import DEFAULT_K, MAX_K, start_server
from fedinterest.common import ranking_pb2, ranking_pb2_grpc
from fedinterest.common.bundle import write_bundle
from fedinterest.common.model import InterestModel, ModelConfig

SETTINGS = settings(max_examples=60, deadline=None)

NUM_ITEMS = 30
SEEN = ["m2", "m4", "m6", "m8"]
SERVICE = "/fedinterest.ranking.v1.Ranking/"
# What a request may legitimately be answered with, besides a reply: a bad argument, bytes gRPC cannot
# parse into the request message (grpcio answers those with INTERNAL itself), or a method that does not exist.
STATUSES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED}


class Service:
    def __init__(self, store_path: Path, channel: grpc.Channel) -> None:
        self.store_path = store_path
        self.channel = channel
        self.stub = ranking_pb2_grpc.RankingStub(channel)
        self.before = snapshot(store_path)

    def raw(self, method: str):
        # No (de)serializers: the bytes go on the wire as they are, and come back as bytes.
        return self.channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)

    def assert_healthy(self) -> None:
        """A good request is answered, and nothing in the store changed."""
        reply = self.stub.Recommend(ranking_pb2.RecommendRequest(k=3), timeout=30)
        assert len(reply.items) == 3 and not {i.item_id for i in reply.items} & set(SEEN)
        assert self.stub.Status(ranking_pb2.StatusRequest(), timeout=30).history_items == len(SEEN)
        assert snapshot(self.store_path) == self.before


def snapshot(store_path: Path) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: conn.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall() for t in tables}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    root = Path(tempfile.mkdtemp(prefix="hostile-rank-"))
    device = make_device(root, num_items=NUM_ITEMS)
    torch.manual_seed(0)
    config = ModelConfig(num_items=NUM_ITEMS, **{k: v for k, v in TINY_RUN.items() if k != "batch_size"})
    bundle = write_bundle(root / "m.bundle", state_dict=InterestModel(config).state_dict(), model_config=config,
                          catalogue_ids=item_ids(NUM_ITEMS), model_card={})
    with device.store() as store:
        ingest_file(store, write_csv(root / "h.csv", user_rows("u1", SEEN)))
        store.save_model("bundle", bundle.read_bytes(), {})
    server, bound = start_server(device.store_path, f"unix:{root / 'rank.sock'}")
    try:
        with grpc.insecure_channel(bound) as channel:
            yield Service(device.store_path, channel)
    finally:
        server.stop(grace=None).wait()


def _varint(value: int) -> bytes:
    """Protobuf varint of `value` taken as 64 bits (a negative number is ten bytes, as protobuf writes it)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@SETTINGS
@given(k=st.one_of(st.integers(0, 20), st.integers(MAX_K - 2, MAX_K + 2), st.integers(-(2**63), 2**64 - 1)))
@example(k=-1)
@example(k=0)
@example(k=2**32)  # beyond uint32: protobuf keeps the low 32 bits (0: the default)
@example(k=2**64 - 1)
def test_any_k_gets_a_ranking_or_invalid_argument(service: Service, k: int) -> None:
    # Field 1 (k) as a varint, written by hand: the generated class refuses what a hostile client can still send.
    request = b"\x08" + _varint(k)
    wire_k = k & 0xFFFFFFFF  # what a uint32 field decodes to
    try:
        raw = service.raw("Recommend")(request, timeout=30)
    except grpc.RpcError as err:
        event(f"status {err.code().name}")
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and wire_k > MAX_K, (err.code(), err.details(), k)
        assert str(MAX_K) in err.details()
    else:
        event("answered")
        reply = ranking_pb2.RecommendReply.FromString(raw)
        expected = min(wire_k or DEFAULT_K, NUM_ITEMS - len(SEEN))
        assert 1 <= (wire_k or DEFAULT_K) <= MAX_K
        assert len(reply.items) == expected and not {i.item_id for i in reply.items} & set(SEEN)
        assert len({i.item_id for i in reply.items}) == expected
        assert [i.score for i in reply.items] == sorted((i.score for i in reply.items), reverse=True)
    service.assert_healthy()


@SETTINGS
@given(method=st.sampled_from(["Recommend", "Status", "Nope", "recommend"]), payload=st.binary(max_size=64))
@example(method="Recommend", payload=b"\x08").via("truncated varint")
@example(method="Recommend", payload=b"\x0a\xff\xff\xff\xff\x0f").via("length-delimited k with a huge length")
@example(method="Recommend", payload=b"\x0d\x00\x00\x00\x00").via("k with the wrong wire type")
@example(method="Status", payload=b"\xff" * 64).via("garbage")
def test_garbage_request_bytes_get_a_status_or_an_answer(service: Service, method: str, payload: bytes) -> None:
    try:
        raw = service.raw(method)(payload, timeout=30)
    except grpc.RpcError as err:
        event(f"status {err.code().name}")
        assert err.code() in STATUSES, (err.code(), err.details())
        if method not in ("Recommend", "Status"):
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    else:
        event("answered")
        assert method in ("Recommend", "Status")
        if method == "Recommend":
            assert len(ranking_pb2.RecommendReply.FromString(raw).items) >= 1
        else:
            assert ranking_pb2.StatusReply.FromString(raw).has_model
    service.assert_healthy()
