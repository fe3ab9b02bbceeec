// Renders docs/asyncapi.yaml as one browsable HTML page with the AsyncAPI generator and its HTML
// template (npm @asyncapi/generator, @asyncapi/html-template; installed outside the checkout).
// Usage: NODE_PATH=<dir with node_modules> node render_asyncapi_html.cjs docs/asyncapi.yaml OUT_DIR
const path = require('path');
const Generator = require('@asyncapi/generator');

(async () => {
  const template = path.dirname(require.resolve('@asyncapi/html-template/package.json'));
  const generator = new Generator(template, path.resolve(process.argv[3]), {
    forceWrite: true,
    install: false, // the template is installed already; nothing is fetched
    templateParams: { singleFile: 'true' },
  });
  await generator.generateFromFile(path.resolve(process.argv[2]));
  console.log(path.join(process.argv[3], 'index.html'));
})().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
