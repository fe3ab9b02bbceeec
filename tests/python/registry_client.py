"""confluent-kafka's SchemaRegistryClient, unchanged, against Elo's local registry.

Usage: registry_client.py REGISTRY_URL SUBJECT_PREFIX
Exits non-zero (assertion) on any deviation from Confluent's behaviour.
"""

import json
import sys
import urllib.error
import urllib.request

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

V1 = '{"type":"record","name":"Thing","namespace":"t","fields":[{"name":"id","type":"string"}]}'
V2_OK = ('{"type":"record","name":"Thing","namespace":"t","fields":[{"name":"id","type":"string"},'
         '{"name":"note","type":["null","string"],"default":null}]}')
V2_BREAKING = ('{"type":"record","name":"Thing","namespace":"t","fields":[{"name":"id","type":"string"},'
               '{"name":"qty","type":"long"}]}')


def expect_error(fn, status, code):
    try:
        fn()
    except SchemaRegistryError as e:
        assert e.http_status_code == status and e.error_code == code, (e.http_status_code, e.error_code, e.error_message)
        return e
    raise AssertionError(f"expected HTTP {status} / {code}")


def main():
    url, prefix = sys.argv[1:3]
    client = SchemaRegistryClient({"url": url})
    subject = f"{prefix}-value"

    first = client.register_schema(subject, Schema(V1, "AVRO"))
    assert client.register_schema(subject, Schema(V1, "AVRO")) == first, "re-registering is idempotent"
    assert client.get_schema(first).schema_str.replace(" ", "") == V1.replace(" ", "")
    assert client.lookup_schema(subject, Schema(V1, "AVRO")).version == 1
    assert subject in client.get_subjects()

    # Default BACKWARD: adding an optional field is fine, a required one is refused with 409.
    second = client.register_schema(subject, Schema(V2_OK, "AVRO"))
    assert second != first
    assert client.get_versions(subject) == [1, 2]
    assert client.get_latest_version(subject).schema_id == second
    assert client.test_compatibility(subject, Schema(V2_BREAKING, "AVRO")) is False
    expect_error(lambda: client.register_schema(subject, Schema(V2_BREAKING, "AVRO")), 409, 409)

    # Compatibility configuration, global and per subject.
    assert client.get_compatibility() == "BACKWARD"
    client.set_compatibility(subject, "NONE")
    assert client.get_compatibility(subject) == "NONE"
    client.register_schema(subject, Schema(V2_BREAKING, "AVRO"))
    client.set_compatibility(subject, "FULL")
    assert client.get_compatibility(subject) == "FULL"

    # Errors as Confluent shapes them.
    expect_error(lambda: client.get_latest_version(f"{prefix}-missing"), 404, 40401)
    expect_error(lambda: client.get_version(subject, 99), 404, 40402)
    expect_error(lambda: client.get_schema(999999), 404, 40403)
    expect_error(lambda: client.register_schema(f"{prefix}-bad", Schema('{"type":"record"', "AVRO")), 422, 42201)

    # The serializer pair, unchanged, round-trips a record through the registry.
    ctx = SerializationContext(prefix, MessageField.VALUE)
    other = f"{prefix}-serde"
    serializer = AvroSerializer(client, V1)
    data = serializer({"id": "abc"}, SerializationContext(other, MessageField.VALUE))
    assert data[0] == 0 and len(data) > 5
    assert AvroDeserializer(client)(data, SerializationContext(other, MessageField.VALUE)) == {"id": "abc"}
    del ctx

    # Soft deletes.
    assert client.delete_subject(subject) == [1, 2, 3]
    # (The client caches "latest"; ask the REST API directly.)
    try:
        urllib.request.urlopen(f"{url}/subjects/{subject}/versions/latest")
        raise AssertionError("deleted subject still served")
    except urllib.error.HTTPError as e:
        assert e.code == 404 and json.load(e)["error_code"] == 40401
    print("registry client checks passed")


if __name__ == "__main__":
    main()
