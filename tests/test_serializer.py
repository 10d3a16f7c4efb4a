"""The wire format: msgspec Structs out, validated Structs in, pickle refused."""

from __future__ import annotations

import pickle

import msgspec
import pytest
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads

from shared.control import pipeline
from shared.control.celery_app import make_app
from shared.control.settings import Settings
from shared.records import serializer
from shared.records.schemas import EncodeBatch, RetrieveGroup

MESSAGE = EncodeBatch(job_id="j", stage="dense", unit="b000001", kind="queries")


def test_struct_round_trips_through_kombu() -> None:
    serializer.register_serializer()
    content_type, encoding, body = dumps(((MESSAGE,), {}, {}), serializer=serializer.NAME)
    assert content_type == serializer.CONTENT_TYPE
    args, _, _ = loads(body, content_type, encoding, accept=[content_type])
    assert msgspec.convert(args[0], EncodeBatch) == MESSAGE


def test_app_accepts_only_msgspec() -> None:
    app = make_app(Settings(broker_url="redis://127.0.0.1:1/0"))
    assert app.conf.accept_content == [serializer.NAME]
    assert app.conf.task_serializer == serializer.NAME
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    for stage in pipeline.STAGES:
        for route in stage.routes.values():
            assert app.conf.task_routes[route.task] == {"queue": route.queue}
    assert app.conf.task_routes["embed_fleet.sparse.retrieve"] == {"queue": "sparse"}


def test_pickle_is_refused() -> None:
    serializer.register_serializer()
    body = pickle.dumps(((MESSAGE.job_id,), {}, {}))
    with pytest.raises(ContentDisallowed):
        loads(body, "application/x-python-serialize", "binary", accept=[serializer.CONTENT_TYPE])


def test_a_malformed_message_fails_validation() -> None:
    with pytest.raises(msgspec.ValidationError, match="unit"):
        msgspec.convert({"job_id": "j", "stage": "dense", "kind": "documents"}, EncodeBatch)
    with pytest.raises(msgspec.ValidationError, match="retriever"):
        msgspec.convert(
            {"job_id": "j", "stage": "retrieve", "unit": "g", "retriever": "x", "batch_ids": []},
            RetrieveGroup,
        )


def test_visibility_timeout_reaches_the_transport() -> None:
    app = make_app(
        Settings(
            broker_url="redis://127.0.0.1:1/0", visibility_timeout=9, unacked_restore_interval=1
        )
    )
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] == 9 and options["unacked_restore_interval"] == 1
