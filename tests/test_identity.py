"""The model's identity, end to end: every set of vectors and every index knows its model, and nothing mixes two.

Each test is a way a user met wrong results before the identity travelled with
the vectors (issue 11): embeddings over gRPC recorded no model, so the tour's
own commands failed; a resumed run mixed two models; a wrong --fingerprint was
taken on trust; a search against another model's index answered nonsense.
The models are the tiny contract models of tests/serving/conftest.py
(fingerprints ``tiny-seed-<n>``), served by the stand-in over loopback gRPC.
"""

from __future__ import annotations

import json

import grpc
import pytest

from street2shop.cli import main
from street2shop.errors import ModelMismatchError, ServerUnavailableError
from street2shop.serving.server import StandInServer
from tests.serving.conftest import build_tiny_savedmodel


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two export bases of one model name: A (weights of seed 0) and B (seed 1)."""
    root = tmp_path_factory.mktemp("exports")
    build_tiny_savedmodel(root / "a" / "1", seed=0, warmup_model_name="street2shop")
    build_tiny_savedmodel(root / "b" / "1", seed=1, warmup_model_name="street2shop")
    return root / "a", root / "b"


def test_the_tour_embed_over_grpc_then_index_then_evaluate_in_process(exports, synth_dataset, tmp_path, capsys):
    model_a, _ = exports
    with StandInServer(model_a, port=0) as server:
        assert main(["embed", str(synth_dataset), "--split", "catalog", "--server", f"127.0.0.1:{server.port}",
                     "--out", str(tmp_path / "emb"), "--json"]) == 0
    embedded = json.loads(capsys.readouterr().out)
    assert embedded["model"] == {"fingerprint": "tiny-seed-0", "version": 1, "dimension": 16}
    assert main(["index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "index"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_fingerprint"] == "tiny-seed-0"
    # Before: "the index was built with model None but the embeddings come from model 'tiny-seed-0'".
    assert main(["evaluate", str(synth_dataset), "--index", str(tmp_path / "index"), "--model", str(model_a),
                 "--out", str(tmp_path / "report"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["queries"] == 6


def test_a_resumed_run_refuses_the_other_model_a_restarted_server_serves(exports, synth_dataset, tmp_path):
    from street2shop.data.records import read_manifest_csv
    from street2shop.embed import embed_catalog
    from street2shop.embedders import GrpcEmbedder

    model_a, model_b = exports
    records = [r for r in read_manifest_csv(synth_dataset) if r.domain == "street"]  # 24 images: 6 chunks of 4

    class DiesAfter(grpc.ServerInterceptor):
        """The server goes away after its third Predict (the probe and two chunks)."""

        def __init__(self):
            self.predicts = 0

        def intercept_service(self, continuation, details):
            if details.method.endswith("/Predict"):
                self.predicts += 1
                if self.predicts > 3:
                    return grpc.unary_unary_rpc_method_handler(lambda request, context: context.abort(grpc.StatusCode.UNAVAILABLE, "gone"))
            return continuation(details)

    out = tmp_path / "emb"
    with StandInServer(model_a, port=0, interceptors=[DiesAfter()]) as server:
        with GrpcEmbedder(f"127.0.0.1:{server.port}", max_retries=0) as embedder:
            with pytest.raises(ServerUnavailableError):
                embed_catalog(records, embedder, out, chunk_size=4, batch_size=4, in_flight=1)
    assert len(list((out / "chunks").glob("chunk-*.npz"))) == 2
    with StandInServer(model_b, port=0) as server:  # restarted on another export
        with GrpcEmbedder(f"127.0.0.1:{server.port}") as embedder:
            # Before: it resumed, exited 0, and the output held vectors of both models.
            with pytest.raises(ModelMismatchError, match="unfinished run of another model \\('tiny-seed-0'.*tiny-seed-1"):
                embed_catalog(records, embedder, out, chunk_size=4, batch_size=4, in_flight=1)
    assert not (out / "embeddings.npy").exists()
    with StandInServer(model_a, port=0) as server:  # the same model again: it resumes
        with GrpcEmbedder(f"127.0.0.1:{server.port}") as embedder:
            result = embed_catalog(records, embedder, out, chunk_size=4, batch_size=4, in_flight=1)
    assert result.resumed_chunks == 2 and len(result.items) == 24 and result.identity.fingerprint == "tiny-seed-0"


def test_the_fingerprint_is_learned_from_the_server_not_taken_on_trust(exports, synth_dataset, tmp_path, capsys):
    model_a, _ = exports
    with StandInServer(model_a, port=0) as server:
        argv = ["embed", str(synth_dataset), "--server", f"127.0.0.1:{server.port}", "--out", str(tmp_path / "emb")]
        # Before: --fingerprint WRONG was recorded as the model of these vectors.
        with pytest.raises(SystemExit) as info:
            main([*argv, "--fingerprint", "WRONG"])
        assert info.value.code == 2 and "unrecognized arguments: --fingerprint" in capsys.readouterr().err
        assert main(argv) == 0
    assert json.loads((tmp_path / "emb" / "embed.json").read_text())["fingerprint"] == "tiny-seed-0"


def test_search_over_grpc_refuses_an_index_of_another_model(exports, synth_dataset, tmp_path, capsys):
    model_a, model_b = exports
    assert main(["embed", str(synth_dataset), "--model", str(model_a), "--out", str(tmp_path / "emb")]) == 0
    assert main(["index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "index")]) == 0
    photo = next((synth_dataset.parent / "images" / "street").glob("p000_*.jpg"))
    capsys.readouterr()
    with StandInServer(model_b, port=0) as server:
        # Before: meaningless rankings without a word.
        assert main(["search", str(photo), "--index", str(tmp_path / "index"), "--server", f"127.0.0.1:{server.port}"]) == 2
    err = capsys.readouterr().err
    assert "tiny-seed-1" in err and "tiny-seed-0" in err and err.count("\n") == 1
    with StandInServer(model_a, port=0) as server:
        assert main(["search", str(photo), "--index", str(tmp_path / "index"), "--server", f"127.0.0.1:{server.port}", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)[str(photo)]
    assert len(answers) == 6 and answers[0]["rank"] == 1


def test_index_build_refuses_a_mix_of_models(exports, synth_dataset, tmp_path, capsys):
    model_a, model_b = exports
    assert main(["embed", str(synth_dataset), "--model", str(model_a), "--out", str(tmp_path / "a")]) == 0
    assert main(["embed", str(synth_dataset), "--model", str(model_b), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main(["index", "build", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "index")]) == 2
    assert "one model's vectors only" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()
    assert main(["index", "build", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "index")]) == 0
