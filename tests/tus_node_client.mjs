// Upload a file with tus-js-client (Node), as the tests' independent tus client.
//
//   node tests/tus_node_client.mjs <endpoint> <file> [options as JSON]
//
// options: protocol (tus-v1, ietf-draft-05), chunkSize (bytes), metadata {k: v}, headers {k: v}, uploadDataDuringCreation,
// uploadLengthDeferred, overridePatchMethod, abortAfter (bytes: abort there once, then resume from the upload's URL),
// stream (send the file as a Node stream, with uploadSize: tus-js-client then cannot tell the last chunk).
// Prints one JSON line {"url", "resumedFrom"} and exits 0, or the error on stderr and exits 1.
import { createReadStream, readFileSync } from "node:fs";
import * as tus from "tus-js-client";

const [endpoint, path, optionsText] = process.argv.slice(2);
const options = JSON.parse(optionsText || "{}");
const data = readFileSync(path);

function upload(uploadUrl, abortAfter) {
  return new Promise((resolve, reject) => {
    let aborted = false;
    let resumedFrom = null;
    const source = options.stream ? createReadStream(path) : data;
    const job = new tus.Upload(source, {
      endpoint,
      uploadSize: options.stream ? data.length : undefined,
      uploadUrl,
      protocol: options.protocol || "tus-v1",
      chunkSize: options.chunkSize || Infinity,
      metadata: options.metadata || {},
      headers: options.headers || {},
      uploadDataDuringCreation: !!options.uploadDataDuringCreation,
      uploadLengthDeferred: !!options.uploadLengthDeferred,
      overridePatchMethod: !!options.overridePatchMethod,
      retryDelays: [0, 200, 500, 1000],
      onProgress(sent) {
        if (resumedFrom === null) resumedFrom = sent;
      },
      onChunkComplete(_chunk, accepted) {
        if (abortAfter && !aborted && accepted >= abortAfter) {
          aborted = true;
          job.abort().then(() => resolve({ aborted: true, url: job.url }));
        }
      },
      onSuccess() {
        resolve({ url: job.url, resumedFrom });
      },
      onError: reject,
    });
    job.start();
  });
}

try {
  let result = await upload(undefined, options.abortAfter);
  if (result.aborted) {
    const resumed = await upload(result.url, 0);
    result = { url: resumed.url, resumedFrom: resumed.resumedFrom, abortedAt: result.url };
  }
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(String(error));
  process.exit(1);
}
