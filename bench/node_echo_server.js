// An echo WebSocket server (node `ws`) on 127.0.0.1, port chosen by the system, which it prints
// as its first line of output once listening.  With a certificate and key file as arguments it
// serves wss:// instead of ws://.  It exits when its standard input closes, so it never outlives
// the test or benchmark that started it.  Used by bench/run.py and test_ws_exporter.py.
const fs = require('fs');
const { WebSocketServer } = require('ws');
const [cert, key] = process.argv.slice(2);
const server = cert
  ? require('https').createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) })
  : require('http').createServer();
const wss = new WebSocketServer({ server });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
});
server.listen(0, '127.0.0.1', () => console.log(String(server.address().port)));
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
