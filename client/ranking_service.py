"""`device serve`: the local gRPC ranking service (common/ranking.proto).

It binds only to a unix socket or a loopback address, so only apps on the device can
ask, and it reads only the device store: the user's history and the latest model. The
model is loaded once and reloaded when the store receives a newer one (a bundle
installed, or a global model from a round), checked by one cheap query per request.
A global model is ranked personalized (client/personalization.py): the adapted copy is
kept until the model or the history changes, so a request pays for the adaptation only
after one of them did.
"""

from __future__ import annotations

import ipaddress
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from fedinterest.client.device_store import DeviceStore
from fedinterest.client.local_models import LoadedModel
from fedinterest.client.personalization_settings import PersonalizationSettings
from fedinterest.client.recommend import FALLBACK, load_or_fallback, rank_unseen
from fedinterest.common import ranking_pb2, ranking_pb2_grpc

DEFAULT_K = 10
MAX_K = 1000


def check_local_address(address: str) -> str:
    """`address` if it is `unix:PATH`, `localhost:PORT` or a loopback IP with a port; ValueError otherwise."""
    if address.startswith("unix:"):
        path = address[len("unix:"):].removeprefix("//")
        if not path or not path.startswith("/"):
            raise ValueError(f"{address!r}: a unix socket address needs an absolute path, e.g. unix:/run/user/1000/fedinterest.sock")
        return f"unix:{path}"
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: expected unix:/path.sock or 127.0.0.1:PORT")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare != "localhost":
        try:
            loopback = ipaddress.ip_address(bare).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"{address!r}: the ranking service binds only to a unix socket or a loopback address "
                "(127.0.0.1, [::1], localhost), never to an address other machines can reach"
            )
    return address


class RankingServicer(ranking_pb2_grpc.RankingServicer):
    """Answers Recommend and Status from the device store at `store_path`."""

    def __init__(self, store_path: Path, personalization: PersonalizationSettings | None = None) -> None:
        self.store_path = store_path
        self.personalization = PersonalizationSettings() if personalization is None else personalization
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._personalized: tuple[tuple[int, bytes], LoadedModel] | None = None  # (model id, history bytes) -> adapted
        self._local = threading.local()  # one SQLite connection per server thread

    def _store(self) -> DeviceStore:
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = DeviceStore(self.store_path)
        return store

    def _model(self, store: DeviceStore) -> LoadedModel:
        latest = store.latest_model_id()
        with self._lock:
            if self._loaded is None or self._loaded.model_id != (latest or 0):
                self._loaded = load_or_fallback(store)  # model_id 0: the catalogue-order fallback
            return self._loaded

    def _personalized_for(self, loaded: LoadedModel, history: np.ndarray) -> LoadedModel:
        key = (loaded.model_id, np.ascontiguousarray(history, dtype=np.int64).tobytes())
        with self._lock:
            if self._personalized is None or self._personalized[0] != key:
                from fedinterest.client.personalization import personalize  # torch: only once a request needs it

                self._personalized = (key, personalize(loaded, history, self.personalization))
            return self._personalized[1]

    def Recommend(self, request: ranking_pb2.RecommendRequest, context: grpc.ServicerContext) -> ranking_pb2.RecommendReply:
        k = request.k or DEFAULT_K
        if k > MAX_K:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must be at most {MAX_K}, got {k}")
        store = self._store()
        loaded = self._model(store)  # the fallback ranking when no model has arrived yet
        history = store.history(loaded.catalogue)
        result = rank_unseen(self._personalized_for(loaded, history.indices), history.indices, k, history_unknown=history.unknown)
        return ranking_pb2.RecommendReply(
            items=[ranking_pb2.RankedItem(item_id=item, score=score) for item, score in result.items],
            model_kind=result.model["kind"], model_sha256=result.model["sha256"], history_used=result.history_used,
        )

    def Status(self, request: ranking_pb2.StatusRequest, context: grpc.ServicerContext) -> ranking_pb2.StatusReply:
        store = self._store()
        history = store.history()
        loaded = self._model(store)
        return ranking_pb2.StatusReply(
            has_model=loaded.description["kind"] != FALLBACK, model_kind=loaded.description["kind"], model_sha256=loaded.description["sha256"],
            catalogue_items=len(loaded.catalogue), history_items=history.total,
        )


def start_server(
    store_path: Path, address: str, *, max_workers: int = 2, personalization: PersonalizationSettings | None = None,
) -> tuple[grpc.Server, str]:
    """Start the service on `address` (checked to be local); the server and the address it is bound to.
    `personalization` defaults to PersonalizationSettings()."""
    address = check_local_address(address)
    DeviceStore(store_path).close()  # a missing or foreign store fails here, not on the first request
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    ranking_pb2_grpc.add_RankingServicer_to_server(RankingServicer(store_path, personalization), server)
    # Server reflection: standard gRPC clients (grpcurl, Postman, ...) list and call the service
    # without a copy of common/ranking.proto.
    from grpc_reflection.v1alpha import reflection

    service = ranking_pb2.DESCRIPTOR.services_by_name["Ranking"].full_name
    reflection.enable_server_reflection((service, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)  # local only (checked above): no TLS needed
    if port == 0:
        raise OSError(f"could not bind the ranking service to {address}")
    server.start()
    bound = address if address.startswith("unix:") or not address.endswith(":0") else f"{address.rpartition(':')[0]}:{port}"
    return server, bound
