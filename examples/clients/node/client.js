#!/usr/bin/env node
'use strict';
// A small clawhub client in Node.js: invoke a skill, list skills, and show the structured error of a failure.
//
//   node client.js invoke NAME [--input JSON | --raw TEXT]
//   node client.js list [--prefix PREFIX] [--query WORD]
//   options: --gateway HOST:PORT (default $CLAWHUB_GATEWAY or 127.0.0.1:50051), --timeout SECONDS (30),
//            credential: $CLAWHUB_TOKEN (an API key or a JWT),
//            --error-format text|json (how a failure is printed on stderr; exit status 1)
const { parseArgs } = require('util');
const grpc = require('@grpc/grpc-js');
const { loadServices } = require('./lib/protos');
const { toValue, fromValue } = require('./lib/value');
const { statusDetails, formatError } = require('./lib/errors');

const DEFAULT_GATEWAY = '127.0.0.1:50051';
const USAGE = `usage: node client.js invoke NAME [--input JSON | --raw TEXT]
       node client.js list [--prefix PREFIX] [--query WORD]
options: --gateway HOST:PORT (default $CLAWHUB_GATEWAY or ${DEFAULT_GATEWAY}), --timeout SECONDS (default 30),
         --error-format text|json`;

// The credential every call carries: an API key or a JWT in $CLAWHUB_TOKEN (`clawhub keys token` prints the one
// the CLI uses), sent as `authorization: Bearer <token>`.
function credentials() {
  const metadata = new grpc.Metadata();
  if (process.env.CLAWHUB_TOKEN) {
    metadata.set('authorization', `Bearer ${process.env.CLAWHUB_TOKEN}`);
  }
  return metadata;
}

function call(client, method, request, timeoutSeconds) {
  return new Promise((resolve, reject) => {
    client[method](request, credentials(), { deadline: Date.now() + timeoutSeconds * 1000 }, (err, response) =>
      (err ? reject(err) : resolve(response)));
  });
}

async function invoke(services, options, name, input) {
  const request = { name };
  if (options.raw !== undefined) {
    request.raw_input = Buffer.from(options.raw, 'utf8');
  } else if (input !== undefined) {
    request.input = toValue(input); // JSON -> google.protobuf.Value
  }
  const client = new services.GatewayService(options.gateway, grpc.credentials.createInsecure());
  try {
    const response = await call(client, 'InvokeSkill', request, options.timeout);
    if (response.output) {
      process.stdout.write(`${JSON.stringify(fromValue(response.output))}\n`); // Value -> JSON text
    } else if (response.raw_output) {
      process.stdout.write(response.raw_output); // the skill's bytes, verbatim
    }
  } finally {
    client.close();
  }
}

async function list(services, options) {
  // The gateway serves clawhub.registry.v1.RegistryService on its port too.
  const client = new services.RegistryService(options.gateway, grpc.credentials.createInsecure());
  try {
    let page_token = '';
    do {
      const request = { prefix: options.prefix || '', query: options.query || '', page_token };
      const response = await call(client, 'ListSkills', request, options.timeout);
      for (const skill of response.skills) {
        console.log([skill.name, skill.latest_version || '-', skill.description || ''].join('\t'));
      }
      page_token = response.next_page_token || '';
    } while (page_token);
  } finally {
    client.close();
  }
}

async function main(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        gateway: { type: 'string', default: process.env.CLAWHUB_GATEWAY || DEFAULT_GATEWAY },
        timeout: { type: 'string', default: '30' },
        'error-format': { type: 'string', default: 'text' },
        input: { type: 'string' },
        raw: { type: 'string' },
        prefix: { type: 'string' },
        query: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    console.error(`${err.message}\n${USAGE}`);
    return 2;
  }
  const { values, positionals } = parsed;
  const [command, ...rest] = positionals;
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  const options = { ...values, timeout: Number(values.timeout) };
  const valid = (command === 'invoke' && rest.length === 1 && !(values.input !== undefined && values.raw !== undefined))
    || (command === 'list' && rest.length === 0);
  if (!valid || !(options.timeout > 0) || !['text', 'json'].includes(values['error-format'])) {
    console.error(USAGE);
    return 2;
  }
  const services = loadServices();
  try {
    if (command === 'invoke') {
      let input;
      try {
        if (values.input !== undefined) input = JSON.parse(values.input);
      } catch (err) {
        console.error(`--input is not JSON: ${err.message}`);
        return 2;
      }
      await invoke(services, options, rest[0], input);
    } else {
      await list(services, options);
    }
    return 0;
  } catch (err) {
    if (err.code === undefined || err.metadata === undefined) throw err; // not a gRPC status: a bug here
    if (values['error-format'] === 'json') {
      const status = statusDetails(err) || { code: err.code, message: err.details, details: [] };
      console.error(JSON.stringify(status, null, 2));
    } else {
      console.error(formatError(err));
      if (err.code === grpc.status.UNAVAILABLE && !statusDetails(err)) {
        console.error(`  Is clawhub running at ${options.gateway}? Point elsewhere with --gateway or CLAWHUB_GATEWAY.`);
      }
    }
    return 1;
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (err) => {
    console.error(err.stack || String(err));
    process.exitCode = 3;
  });
}

module.exports = { main };
