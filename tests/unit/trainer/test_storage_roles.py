"""Per-URI credentials: each role (model, dataset, output) reads its own Secret's variables, which
the operator adds under the role's prefix (builders.secret_env_sources)."""

from __future__ import annotations

from lorakube_api import contract
from lorakube_trainer import storage

ENV = {
    # the model's Secret: credentials and its own endpoint
    "LORAKUBE_MODEL_AWS_ACCESS_KEY_ID": "model-id",
    "LORAKUBE_MODEL_AWS_SECRET_ACCESS_KEY": "model-secret",
    "LORAKUBE_MODEL_AWS_ENDPOINT_URL": "http://models.example:9000",
    # the output's Secret: credentials only
    "LORAKUBE_OUTPUT_AWS_ACCESS_KEY_ID": "output-id",
    "LORAKUBE_OUTPUT_AWS_SECRET_ACCESS_KEY": "output-secret",
    # unprefixed: spec.resources.env (or a Secret added by an operator of an earlier version)
    "AWS_ACCESS_KEY_ID": "plain-id",
    "AWS_SECRET_ACCESS_KEY": "plain-secret",
    "AWS_SESSION_TOKEN": "plain-token",
    "AWS_ENDPOINT_URL": "http://plain.example:9000",
    "LORAKUBE_S3_ADDRESSING_STYLE": "path",
    "PATH": "/usr/bin",
}


def _options(role: str) -> dict:
    settings = storage.settings_from_env(storage.role_env(ENV, role))
    return {"key": settings.get("key"), "secret": settings.get("secret"), "token": settings.get("token"),
            "endpoint": settings["client_kwargs"].get("endpoint_url"),
            "style": settings["config_kwargs"]["s3"]["addressing_style"]}


def test_each_role_uses_its_own_secret_and_falls_back_to_the_unprefixed_variables():
    # The model's Secret wins whole: its key pair, no session token of another source, its endpoint.
    assert _options("model") == {"key": "model-id", "secret": "model-secret", "token": None,
                                 "endpoint": "http://models.example:9000", "style": "path"}
    # The output's Secret holds no endpoint: the unprefixed one applies, with the output's own keys.
    assert _options("output") == {"key": "output-id", "secret": "output-secret", "token": None,
                                  "endpoint": "http://plain.example:9000", "style": "path"}
    # No Secret for the dataset: everything unprefixed, as before per-role prefixes existed.
    assert _options("dataset") == {"key": "plain-id", "secret": "plain-secret", "token": "plain-token",
                                   "endpoint": "http://plain.example:9000", "style": "path"}


def test_a_role_never_sees_another_roles_secret():
    for role in contract.STORAGE_ROLES:
        env = storage.role_env(ENV, role)
        others = [v for name, v in ENV.items() if name.startswith(tuple(contract.SECRET_ENV_PREFIXES.values()))
                  and not name.startswith(contract.SECRET_ENV_PREFIXES[role])]
        assert not set(others) & set(env.values()), role
        assert not [name for name in env if name.startswith(tuple(contract.SECRET_ENV_PREFIXES.values()))], role
    assert storage.role_env(ENV, "dataset")["PATH"] == "/usr/bin"


def test_a_secret_holding_only_settings_keeps_the_unprefixed_credentials():
    env = {"LORAKUBE_DATASET_AWS_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "plain-id",
           "AWS_SECRET_ACCESS_KEY": "plain-secret", "AWS_REGION": "us-east-1"}
    settings = storage.settings_from_env(storage.role_env(env, "dataset"))
    assert (settings["key"], settings["secret"]) == ("plain-id", "plain-secret")
    assert settings["client_kwargs"]["region_name"] == "eu-west-1"


def test_an_error_message_never_shows_a_prefixed_secret(monkeypatch):
    monkeypatch.setenv("LORAKUBE_OUTPUT_AWS_SECRET_ACCESS_KEY", "s3cr3t-value-of-the-output")
    message = storage._describe(PermissionError("denied for s3cr3t-value-of-the-output"))
    assert "s3cr3t" not in message and "***" in message


def test_a_node_other_than_zero_never_touches_a_remote_output(tmp_path):
    # Its pod may lack the output's Secret (checkpoints on a volume): the endpoint below refuses every
    # connection, so any listing of the output (the metrics a resume fetches) would fail the run.
    from lorakube_trainer import remote
    from lorakube_trainer.config import parse_config

    cfg = parse_config(["--model_family", "flux", "--model_path", str(tmp_path), "--dataset_path", str(tmp_path),
                        "--output_path", "s3://loras/cats", "--checkpoint_dir", str(tmp_path / "ckpt"),
                        "--resume", "auto", "--height", "64", "--width", "64"], env={})
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", storage.ENV_CACHE_DIR: str(tmp_path / "cache")}
    local, where = remote.localize(cfg, env, node_rank=1)
    assert where.output == "s3://loras/cats" and local.output_path.startswith(str(tmp_path / "cache"))
    assert local.checkpoint_dir == str(tmp_path / "ckpt")
