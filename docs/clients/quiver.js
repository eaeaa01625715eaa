// A Quiver client in Node.js, built from the .proto files alone (no generated code): stream a generation
// with an adapter, upload an adapter directory, list the adapters. See docs/clients.md.
//
//   node quiver.js stream "Write a haiku." [--adapter ID] [--max-new-tokens N] [--json]
//   node quiver.js upload ID DIR [--replace]
//   node quiver.js list
//
// Environment: QUIVER_SERVER (default 127.0.0.1:50051), QUIVER_TOKEN (a bearer token, if the server has
// tokens), QUIVER_TLS_CA (a PEM file: connect with TLS), QUIVER_PROTOS (default ../../protos, the folder
// holding quiver/v1/*.proto).
"use strict";
const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = process.env.QUIVER_PROTOS || path.join(__dirname, "..", "..", "protos");
const CHUNK_BYTES = 1 << 20; // well under the server's 4 MiB message limit

function services() {
  const files = ["quiver/v1/inference.proto", "quiver/v1/adapters.proto"];
  // keepCase: fields keep their .proto names (adapter_id); uint64 fields arrive as strings.
  const definition = protoLoader.loadSync(files, { includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true });
  const v1 = grpc.loadPackageDefinition(definition).quiver.v1;
  const server = process.env.QUIVER_SERVER || "127.0.0.1:50051";
  const ca = process.env.QUIVER_TLS_CA;
  const credentials = ca ? grpc.credentials.createSsl(fs.readFileSync(ca)) : grpc.credentials.createInsecure();
  return { inference: new v1.InferenceService(server, credentials), adapters: new v1.AdapterService(server, credentials) };
}

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.QUIVER_TOKEN) md.set("authorization", `Bearer ${process.env.QUIVER_TOKEN}`);
  return md;
}

function fail(error) {
  // error.code is a grpc.status number; error.details the server's message
  console.error(`${grpc.status[error.code]}: ${error.details}`);
  process.exit(1);
}

function stream(prompt, { adapter = "", maxNewTokens = 64, json = false }) {
  const request = {
    adapter_id: adapter, // empty: the base model
    prompt: { text: prompt },
    stopping: { max_new_tokens: maxNewTokens },
  };
  const call = services().inference.GenerateStream(request, metadata());
  call.on("data", (message) => {
    if (json) console.log(JSON.stringify(message));
    else process.stdout.write(message.text);
  });
  call.on("error", fail);
  call.on("end", () => { if (!json) process.stdout.write("\n"); });
}

function upload(adapterId, dir, { replace = false }) {
  const call = services().adapters.UploadAdapter(metadata(), (error, response) => {
    if (error) fail(error);
    console.log(JSON.stringify(response));
  });
  call.write({ header: { adapter_id: adapterId, replace } }); // the header first, once
  for (const name of fs.readdirSync(dir).sort()) {
    const data = fs.readFileSync(path.join(dir, name));
    // a file's chunks in order, files one after another; an empty file is one empty chunk
    for (let at = 0; at === 0 || at < data.length; at += CHUNK_BYTES) {
      call.write({ chunk: { file_name: name, data: data.subarray(at, at + CHUNK_BYTES) } });
    }
  }
  call.end();
}

function list() {
  services().adapters.ListAdapters({}, metadata(), (error, response) => {
    if (error) fail(error);
    console.log(JSON.stringify(response.adapters));
  });
}

function main(argv) {
  const [command, ...args] = argv;
  const flag = (name) => args.includes(name);
  const option = (name, fallback) => (args.includes(name) ? args[args.indexOf(name) + 1] : fallback);
  if (command === "stream") {
    stream(args[0], { adapter: option("--adapter", ""), maxNewTokens: Number(option("--max-new-tokens", 64)), json: flag("--json") });
  } else if (command === "upload") {
    upload(args[0], args[1], { replace: flag("--replace") });
  } else if (command === "list") {
    list();
  } else {
    console.error("usage: node quiver.js stream PROMPT [--adapter ID] [--max-new-tokens N] [--json] | upload ID DIR [--replace] | list");
    process.exit(2);
  }
}

main(process.argv.slice(2));
