// Validates docs/asyncapi.yaml with the AsyncAPI parser (npm @asyncapi/parser, with the Avro
// schema parser so the `$ref`s to schemas/*.avsc are resolved and checked), then prints one
// JSON line per channel: address, kafka binding, operations, and per message its name, schema
// format, the fields its payload resolves to, its headers and key.
// Usage: NODE_PATH=<dir with node_modules> node validate_asyncapi.cjs docs/asyncapi.yaml
const { Parser, fromFile } = require('@asyncapi/parser');
const { AvroSchemaParser } = require('@asyncapi/avro-schema-parser');

async function main() {
  const parser = new Parser();
  parser.registerSchemaParser(AvroSchemaParser());
  const { document, diagnostics } = await fromFile(parser, process.argv[2]).parse();
  const errors = diagnostics.filter((d) => d.severity === 0);
  for (const d of diagnostics) {
    console.error(`${['error', 'warning', 'info', 'hint'][d.severity]} ${d.code} at ${d.path.join('/')}: ${d.message}`);
  }
  if (!document || errors.length) {
    console.error(`invalid: ${errors.length} errors`);
    process.exit(1);
  }
  if (document.version() !== '3.0.0') {
    console.error(`expected AsyncAPI 3.0.0, got ${document.version()}`);
    process.exit(1);
  }
  for (const channel of document.channels()) {
    const messages = channel.messages().all().map((m) => {
      const payload = m.payload();
      return {
        name: m.name(),
        schemaFormat: m.schemaFormat(),
        // The Avro parser turns the .avsc into JSON Schema: these are the record's fields.
        fields: payload && payload.properties() ? Object.keys(payload.properties()) : [],
        headers: m.hasHeaders() ? Object.keys(m.headers().properties() || {}) : [],
        key: m.bindings().get('kafka') ? m.bindings().get('kafka').value().key : null,
      };
    });
    const kafka = channel.bindings().get('kafka');
    console.log(JSON.stringify({ address: channel.address(), messages, kafka: kafka ? kafka.value() : null,
      operations: channel.operations().all().map((o) => o.action()) }));
  }
}

main().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
