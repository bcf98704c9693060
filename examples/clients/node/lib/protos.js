'use strict';
// Loads the clawhub services from the repository's protos/ directory, and google.rpc.Status with its details
// from the copies under ./protos (googleapis, Apache-2.0).
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

// The repository's protos/ (override with CLAWHUB_PROTOS when this directory is copied elsewhere).
const CLAWHUB_PROTOS = process.env.CLAWHUB_PROTOS || path.resolve(__dirname, '..', '..', '..', '..', 'protos');
const OWN_PROTOS = path.resolve(__dirname, '..', 'protos');

// Only the public services, by file: what the gateway's port serves.
const SERVICE_FILES = [
  'clawhub/gateway/v1/gateway_service.proto',
  'clawhub/registry/v1/registry_service.proto',
];

// How proto-loader turns messages into JavaScript objects (the same options for requests and responses):
const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto (`raw_output`, `next_page_token`), not camelCase
  longs: String, // int64/uint64 as decimal strings: exact beyond 2^53
  enums: String, // enum values by name (`RELEASE_STATE_READY`, `NULL_VALUE`)
  defaults: false, // unset fields stay absent...
  arrays: true, // ...except repeated fields (an empty list is [])
  objects: true, // and maps (an empty map is {})
  oneofs: true, // the set member of a oneof is named in a virtual field (`kind` of a Value, `payload`)
  includeDirs: [CLAWHUB_PROTOS], // google/protobuf/*.proto come with proto-loader
};

function loadServices() {
  for (const file of SERVICE_FILES) {
    if (!fs.existsSync(path.join(CLAWHUB_PROTOS, file))) {
      throw new Error(`${file} not found under ${CLAWHUB_PROTOS}; set CLAWHUB_PROTOS to the repository's protos/`);
    }
  }
  const definition = protoLoader.loadSync(SERVICE_FILES, LOADER_OPTIONS);
  const loaded = grpc.loadPackageDefinition(definition);
  return {
    GatewayService: loaded.clawhub.gateway.v1.GatewayService,
    RegistryService: loaded.clawhub.registry.v1.RegistryService,
  };
}

// google.rpc.Status and the detail messages (ErrorInfo, BadRequest, RetryInfo, ...), as protobufjs types.
function loadErrorTypes() {
  const root = new protobuf.Root();
  // Resolve imports against ./protos; google/protobuf/any.proto and duration.proto are built into protobufjs.
  root.resolvePath = (origin, target) => {
    const own = path.join(OWN_PROTOS, target);
    return fs.existsSync(own) ? own : target;
  };
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  return root;
}

module.exports = { loadServices, loadErrorTypes, LOADER_OPTIONS, CLAWHUB_PROTOS };
