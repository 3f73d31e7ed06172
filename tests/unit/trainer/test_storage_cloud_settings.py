"""gs:// and az:// settings from a role's environment: which Secret keys give which client
arguments, the errors a malformed or missing credential gives (naming the key, never its value),
and credentials kept as a group per role. The servers themselves: tests/integration/trainer/
test_cloud_storage_emulated.py."""

from __future__ import annotations

import json

import pytest

from lorakube_trainer import storage

def _key_file(project: str = "proj-1") -> dict:
    """A service-account key file as Google issues it, with a fresh RSA key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    return {"type": "service_account", "project_id": project, "private_key_id": "k1", "private_key": pem,
            "client_email": f"trainer@{project}.iam.gserviceaccount.com", "token_uri": "https://oauth2.example/token"}


KEY_FILE = _key_file()


def test_a_service_account_key_file_becomes_gcsfs_credentials_and_project():
    settings = storage.gcs_settings_from_env({"GCS_SERVICE_ACCOUNT_JSON": json.dumps(KEY_FILE),
                                              "GCS_ENDPOINT_URL": "https://storage-psc.p.example"})
    assert settings["token"].service_account_email == KEY_FILE["client_email"]
    assert settings["token"].scopes == [storage.GCS_SCOPE]
    assert settings["project"] == "proj-1" and settings["endpoint_url"] == "https://storage-psc.p.example"
    assert storage.gcs_settings_from_env({"GCS_SERVICE_ACCOUNT_JSON": json.dumps(KEY_FILE),
                                          "GOOGLE_CLOUD_PROJECT": "other"})["project"] == "other"


def test_without_a_key_gcs_uses_application_default_credentials_and_an_emulator_anonymously():
    assert "token" not in storage.gcs_settings_from_env({})          # gcsfs's chain: Workload Identity, ...
    emulated = storage.gcs_settings_from_env({"STORAGE_EMULATOR_HOST": "10.0.0.5:4443",
                                              "GCS_SERVICE_ACCOUNT_JSON": json.dumps(KEY_FILE)})
    assert emulated["endpoint_url"] == "http://10.0.0.5:4443" and emulated["token"] == "anon"


def test_a_key_file_whose_private_key_cannot_load_names_the_key_and_never_quotes_it():
    broken = {**KEY_FILE, "private_key": "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"}
    with pytest.raises(storage.StorageError) as failed:
        storage.gcs_settings_from_env({"GCS_SERVICE_ACCOUNT_JSON": json.dumps(broken)})
    assert str(failed.value).startswith("GCS_SERVICE_ACCOUNT_JSON: the key file could not be loaded")
    assert "bm90IGEga2V5" not in str(failed.value)


@pytest.mark.parametrize("value", ["not json at all", json.dumps({"client_email": "x"}), "[1, 2]"])
def test_a_malformed_service_account_key_names_the_key_and_never_quotes_it(value):
    with pytest.raises(storage.StorageError) as failed:
        storage.gcs_settings_from_env({"GCS_SERVICE_ACCOUNT_JSON": value})
    assert "GCS_SERVICE_ACCOUNT_JSON must hold a service-account key file's JSON" in str(failed.value)
    assert value not in str(failed.value)


@pytest.mark.parametrize(("env", "expected"), [
    ({"AZURE_STORAGE_CONNECTION_STRING": "AccountName=a;AccountKey=k"}, {"connection_string": "AccountName=a;AccountKey=k"}),
    ({"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_ACCOUNT_KEY": "k"}, {"account_name": "acct", "account_key": "k"}),
    ({"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_SAS_TOKEN": "sv=1&sig=x"},
     {"account_name": "acct", "sas_token": "sv=1&sig=x"}),
    # the account alone: DefaultAzureCredential (workload identity, managed identity)
    ({"AZURE_STORAGE_ACCOUNT_NAME": "acct"}, {"account_name": "acct", "anon": False}),
])
def test_azure_credentials_from_the_secret_keys(env, expected):
    settings = storage.azure_settings_from_env(env)
    assert {k: settings[k] for k in expected} == expected
    assert settings["assume_container_exists"] is True     # never created, never probed with a call a SAS may lack


def test_azure_without_an_account_names_the_keys_to_set():
    with pytest.raises(storage.StorageError, match="az:// needs AZURE_STORAGE_CONNECTION_STRING, or "
                                                   "AZURE_STORAGE_ACCOUNT_NAME"):
        storage.azure_settings_from_env({})


def test_a_roles_azure_or_gcs_secret_replaces_the_unprefixed_credentials_whole():
    env = {"AZURE_STORAGE_ACCOUNT_NAME": "plain", "AZURE_STORAGE_ACCOUNT_KEY": "plain-key",
           "LORAKUBE_OUTPUT_AZURE_STORAGE_CONNECTION_STRING": "AccountName=out;AccountKey=out-key",
           "GCS_SERVICE_ACCOUNT_JSON": "plain-json", "LORAKUBE_MODEL_GCS_SERVICE_ACCOUNT_JSON": "model-json"}
    output = storage.role_env(env, "output")
    assert output["AZURE_STORAGE_CONNECTION_STRING"] == "AccountName=out;AccountKey=out-key"
    assert "AZURE_STORAGE_ACCOUNT_KEY" not in output and "AZURE_STORAGE_ACCOUNT_NAME" not in output
    assert storage.azure_settings_from_env(output)["connection_string"] == "AccountName=out;AccountKey=out-key"
    assert "account_key" not in storage.azure_settings_from_env(output)
    assert storage.role_env(env, "model")["GCS_SERVICE_ACCOUNT_JSON"] == "model-json"
    # a role without a Secret keeps the unprefixed group
    dataset = storage.role_env(env, "dataset")
    assert (dataset["AZURE_STORAGE_ACCOUNT_NAME"], dataset["AZURE_STORAGE_ACCOUNT_KEY"]) == ("plain", "plain-key")


def test_an_error_message_never_shows_an_azure_key_or_sas_signature(monkeypatch):
    key = "c2VjcmV0LWFjY291bnQta2V5LWJ5dGVz"
    sig = "Zm9vYmFyc2lnbmF0dXJlMTIzNA%3D%3D"
    monkeypatch.setenv("LORAKUBE_OUTPUT_AZURE_STORAGE_CONNECTION_STRING",
                       f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={key};EndpointSuffix=core.windows.net")
    monkeypatch.setenv("LORAKUBE_MODEL_AZURE_STORAGE_SAS_TOKEN", f"sv=2024-01-01&sp=rl&sig={sig}")
    message = storage._describe(OSError(f"refused https://acct.blob.core.windows.net/c?sp=rl&sig={sig} key {key}"))
    assert key not in message and sig not in message and message.count("***") == 2


@pytest.mark.parametrize(("uri", "module"), [("s3://b/p", "s3fs"), ("gs://b/p", "gcsfs"), ("az://c/p", "adlfs")])
def test_each_scheme_gets_its_own_fsspec_file_system(uri, module):
    env = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:1", "AZURE_STORAGE_CONNECTION_STRING":
           "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:1/a;"}
    assert type(storage.filesystem(env, uri)).__module__.split(".")[0] == module
