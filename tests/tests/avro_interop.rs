//! Cross-implementation proof: events Elo encodes (Confluent framing + registry) decode with
//! Python's fastavro and confluent-kafka, and events those encode decode in Elo.

use std::path::Path;
use std::process::Command;

use elo_events::codec::unframe;
use elo_events::{CommerceEvent, CommerceEventType, Decimal4, EventCodec, InventoryStatus, RegistryConfig, sample};
use elo_integration_tests::{registry_url, unique};
use serde_json::json;

fn python_script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/avro_interop.py")
}

#[tokio::test]
async fn elo_and_python_read_each_others_events() {
    let topic = unique("interop.commerce");
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let events: Vec<CommerceEvent> = (0..24).map(sample::order_placed).collect();
    let mut records = Vec::new();
    let mut expect = Vec::new();
    for event in &events {
        let framed = codec.encode(&topic, event).await.unwrap();
        records.push(framed.iter().map(|b| format!("{b:02x}")).collect::<String>());
        let order = event.order.as_ref().unwrap();
        expect.push(json!({
            "event_id": event.event_id,
            "event_type": event.event_type.as_str(),
            "customer_key": event.customer_key,
            "occurred_at": event.occurred_at,
            "grand_total": order.totals.grand_total.to_string(),
            "skus": order.items.iter().map(|i| i.sku.clone()).collect::<Vec<_>>(),
            "consent": format!("{:?}", event.customer.as_ref().unwrap().consent.status).to_uppercase(),
        }));
    }
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.json"), dir.path().join("out.json"));
    let schema_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/commerce.events.avsc");
    std::fs::write(&input, json!({"records": records, "expect": expect, "schema_path": schema_path}).to_string())
        .unwrap();

    let out = Command::new("python3")
        .arg(python_script())
        .arg(registry_url())
        .arg(&topic)
        .arg(&input)
        .arg(&output)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python side failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let answer: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let hex =
        |s: &str| (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect::<Vec<u8>>();

    // Python decoded and re-encoded every record: the bytes it wrote decode to the original.
    let reencoded = answer["reencoded"].as_array().unwrap();
    assert_eq!(reencoded.len(), events.len());
    for (original, again) in events.iter().zip(reencoded) {
        let decoded: CommerceEvent = codec.decode(&hex(again.as_str().unwrap())).await.unwrap();
        assert_eq!(&decoded, original);
    }

    // Events that Python's serializer wrote (and registered) decode in Elo with their values.
    let originated = answer["originated"].as_array().unwrap();
    assert_eq!(originated.len(), 5);
    let first_id = unframe(&hex(originated[0].as_str().unwrap())).unwrap().0;
    assert_eq!(first_id, codec.schema_id::<CommerceEvent>(&topic).await.unwrap(), "same schema, same registry id");
    for (n, framed) in originated.iter().enumerate() {
        let event: CommerceEvent = codec.decode(&hex(framed.as_str().unwrap())).await.unwrap();
        assert_eq!(event.event_id, format!("py-{n}"));
        assert_eq!(event.event_type, CommerceEventType::OrderChanged);
        assert_eq!(event.occurred_at, 1_793_620_800_000 + n as i64 * 1000, "2026-11-02T12:00:0{n}Z");
        assert_eq!(event.produced_at, event.occurred_at + 500);
        let order = event.order.unwrap();
        assert_eq!(order.totals.grand_total, Decimal4::parse(&format!("{}.56", 1234 + n)).unwrap());
        assert_eq!(order.totals.discount, Decimal4::from_unscaled(-(n as i64)));
        assert_eq!(order.items[0].name, "Caneca ☕");
        assert_eq!(order.inventory_status, InventoryStatus::LowStock);
        assert!(event.customer.is_none() && event.erasure.is_none());
    }
}
