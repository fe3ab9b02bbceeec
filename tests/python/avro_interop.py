"""Cross-implementation proof for Elo's event contracts.

Reads Confluent-framed records that Elo (Rust, apache-avro) wrote, decodes them with two
independent Python implementations -- fastavro with the writer schema fetched from the
registry by id, and confluent-kafka's AvroDeserializer with its SchemaRegistryClient -- checks
them against the values Elo says it wrote, and re-encodes each one with fastavro under the
same schema id. Then it originates events of its own with confluent-kafka's AvroSerializer
(which registers through the registry client) for Elo to decode.

Usage: avro_interop.py REGISTRY_URL TOPIC INPUT_JSON OUTPUT_JSON
"""

import datetime
import decimal
import io
import json
import struct
import sys
import urllib.request

import fastavro
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def fetch_schema(registry, schema_id):
    with urllib.request.urlopen(f"{registry}/schemas/ids/{schema_id}") as r:
        return fastavro.parse_schema(json.loads(json.load(r)["schema"]))


def unframe(data):
    assert data[0] == 0, f"magic byte {data[0]}"
    return struct.unpack(">I", data[1:5])[0], data[5:]


def millis(value):
    return int(value.timestamp() * 1000) if isinstance(value, datetime.datetime) else value


def main():
    registry, topic, input_path, output_path = sys.argv[1:5]
    data = json.load(open(input_path))
    client = SchemaRegistryClient({"url": registry})
    deserializer = AvroDeserializer(client)
    ctx = SerializationContext(topic, MessageField.VALUE)
    schemas = {}
    reencoded = []
    for record_hex, expect in zip(data["records"], data["expect"]):
        framed = bytes.fromhex(record_hex)
        schema_id, body = unframe(framed)
        schema = schemas.setdefault(schema_id, fetch_schema(registry, schema_id))
        event = fastavro.schemaless_reader(io.BytesIO(body), schema)
        via_client = deserializer(framed, ctx)
        assert event == via_client, "fastavro and confluent-kafka disagree"
        order = event["order"]
        assert event["event_id"] == expect["event_id"]
        assert event["event_type"] == expect["event_type"]
        assert event["customer_key"] == expect["customer_key"]
        assert millis(event["occurred_at"]) == expect["occurred_at"]
        assert isinstance(order["totals"]["grand_total"], decimal.Decimal)
        assert str(order["totals"]["grand_total"]) == expect["grand_total"], (order["totals"]["grand_total"], expect["grand_total"])
        assert [i["sku"] for i in order["items"]] == expect["skus"]
        assert event["customer"]["consent"]["status"] == expect["consent"]
        out = io.BytesIO()
        fastavro.schemaless_writer(out, schema, event)
        reencoded.append((b"\x00" + struct.pack(">I", schema_id) + out.getvalue()).hex())

    # Events that start life in Python.
    serializer = AvroSerializer(client, open(data["schema_path"]).read())
    originated = []
    for n in range(5):
        event = {
            "event_id": f"py-{n}",
            "event_type": "ORDER_CHANGED",
            "source_system": "magento",
            "source_version": {"entity_type": "order", "entity_id": str(900 + n),
                               "updated_at": datetime.datetime(2026, 11, 2, 12, 0, n, tzinfo=datetime.timezone.utc)},
            "occurred_at": datetime.datetime(2026, 11, 2, 12, 0, n, tzinfo=datetime.timezone.utc),
            "produced_at": datetime.datetime(2026, 11, 2, 12, 0, n, 500000, tzinfo=datetime.timezone.utc),
            "customer_key": f"g:{n:064x}",
            "store": {"store_id": 2, "store_code": "br", "website_id": 1},
            "order": {
                "entity_id": 900 + n, "increment_id": f"{900 + n:09d}", "state": "processing", "status": "processing",
                "currency": "BRL", "created_at": datetime.datetime(2026, 11, 2, 11, 0, 0, tzinfo=datetime.timezone.utc),
                "totals": {"grand_total": decimal.Decimal("1234.5600") + n, "subtotal": decimal.Decimal("1200.0000"),
                           "tax": decimal.Decimal("0.0000"), "shipping": decimal.Decimal("34.5600"),
                           "discount": decimal.Decimal("-0.0001") * n, "total_qty_ordered": decimal.Decimal("3.0000")},
                "items": [{"item_id": 1, "sku": "PY-SKU", "name": "Caneca ☕", "product_id": None, "product_type": "bundle",
                           "qty_ordered": decimal.Decimal("3.0000"), "price": decimal.Decimal("400.0000"),
                           "row_total": decimal.Decimal("1200.0000"), "tax": decimal.Decimal("0.0000"),
                           "discount": decimal.Decimal("0.0000"), "parent_item_id": None}],
                "billing_address": None, "shipping_address": None, "payment_method": "pix",
                "shipping_method": None, "inventory_status": "LOW_STOCK",
            },
            "customer": None,
            "erasure": None,
        }
        originated.append(serializer(event, ctx).hex())
    json.dump({"reencoded": reencoded, "originated": originated}, open(output_path, "w"))
    print(f"python decoded {len(reencoded)} Elo records and originated {len(originated)}")


if __name__ == "__main__":
    main()
