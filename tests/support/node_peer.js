// The lab's Node.js peer: an HTTPS server or one GET, each writing its own key log
// (Node's 'keylog' events) for keytap's to be compared with.
//   node node_peer.js server HOST PORT CERT KEY KEYLOG
//   node node_peer.js client URL TLS_VERSION KEYLOG     (TLS_VERSION: 1.2 or 1.3)
"use strict";
const fs = require("fs");
const https = require("https");

const [mode, ...args] = process.argv.slice(2);
const logTo = (path) => (line) => fs.appendFileSync(path, line);

if (mode === "server") {
  const [host, port, cert, key, keylog] = args;
  const server = https.createServer(
    { cert: fs.readFileSync(cert), key: fs.readFileSync(key), minVersion: "TLSv1.2" },
    (request, response) => {  // /bytes/N: N bytes of a..z, over and over
      const size = Number(request.url.split("/")[2]) || 0;
      const body = Buffer.alloc(size);
      for (let i = 0; i < size; i++) body[i] = 97 + (i % 26);
      response.end(body);
    });
  server.on("keylog", logTo(keylog));
  server.listen(Number(port), host);
} else if (mode === "client") {
  const [url, version, keylog] = args;
  const tls = version === "1.3" ? "TLSv1.3" : "TLSv1.2";
  const agent = new https.Agent({ keepAlive: false, minVersion: tls, maxVersion: tls });
  agent.on("keylog", logTo(keylog));
  https.get(url, { agent, rejectUnauthorized: false }, (response) => {
    let received = 0;
    response.on("data", (chunk) => { received += chunk.length; });
    response.on("end", () => {
      console.log(`HTTP ${response.statusCode} ${received} bytes over ${response.socket.getProtocol?.() ?? tls}`);
    });
  }).on("error", (error) => { console.error(String(error)); process.exit(1); });
} else {
  console.error("usage: node_peer.js server HOST PORT CERT KEY KEYLOG | client URL 1.2|1.3 KEYLOG");
  process.exit(2);
}
