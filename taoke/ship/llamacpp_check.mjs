// Runs a GGUF file in real llama.cpp (the prebuilt binaries of the npm package node-llama-cpp) for taoke's
// export check. Reads one JSON request (argv[2]), prints one JSON answer on stdout:
//   tokenize: texts              -> llama.cpp's token ids (special tokens parsed)
//   greedy:   [{ids, n, ignore_eog}] -> up to n greedy tokens after ids (stops at an end-of-generation token,
//                                    unless ignore_eog: then exactly n, as a speed measurement needs)
//   nll:      [{ids, positions}] -> for each i in positions, log p(ids[i+1] | ids[..i]) from the full softmax
// argv[3] is the node_modules folder holding node-llama-cpp (installed by `make llama`).
import {readFileSync} from "node:fs";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const {getLlama} = await import(pathToFileURL(join(process.argv[3], "node-llama-cpp", "dist", "index.js")).href);
const pkg = JSON.parse(readFileSync(join(process.argv[3], "node-llama-cpp", "package.json"), "utf8"));

const started = Date.now();
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: request.model});
const longest = Math.max(16, ...(request.greedy ?? []).map((g) => g.ids.length + g.n),
                         ...(request.nll ?? []).map((r) => r.ids.length));
const context = await model.createContext({contextSize: Math.min(longest + 8, model.trainContextSize),
                                           threads: request.threads ?? 0, batchSize: 512});
const sequence = context.getSequence();
const answer = {
    versions: {"node-llama-cpp": pkg.version, "llama.cpp": llama.llamaCppRelease?.release ?? null},
    // which CPU kernels ran (e.g. "AVX2 = 1 | AVX512 = 1 | ..."): quantised matmuls round differently on each
    system_info: llama.systemInfo,
    metadata: {
        architecture: model.fileInfo.metadata.general?.architecture,
        chat_template: model.fileInfo.metadata.tokenizer?.chat_template ?? null,
        tokenizer_pre: model.fileInfo.metadata.tokenizer?.ggml?.pre ?? null,
        block_count: model.fileInfo.metadata.llama?.block_count ?? null,
    },
    seconds: {load: (Date.now() - started) / 1000},
};

answer.tokenize = (request.tokenize ?? []).map((text) => Array.from(model.tokenize(text, true)));

// Greedy continuations, timed as generation tokens per second (the prompt's own evaluation included).
let generated = 0;
let t0 = Date.now();
answer.greedy = [];
for (const g of request.greedy ?? []) {
    await sequence.clearHistory();
    const out = [];
    if (g.n > 0) {
        // node-llama-cpp itself ends the generator at an end-of-generation token, unless told to yield it
        for await (const token of sequence.evaluate(g.ids, {temperature: 0, yieldEogToken: !!g.ignore_eog})) {
            out.push(token);
            if (out.length >= g.n) break;
        }
    }
    generated += out.length;
    answer.greedy.push(out);
}
answer.seconds.greedy = (Date.now() - t0) / 1000;
answer.generated_tokens = generated;

// Log-probabilities of the given next tokens, from the whole distribution (no top-k / top-p / min-p cut).
t0 = Date.now();
const full = {temperature: 1, topK: 0, topP: 1, minP: 0};
answer.nll = [];
for (const row of request.nll ?? []) {
    await sequence.clearHistory();
    const wanted = new Set(row.positions);
    const input = row.ids.map((id, i) => wanted.has(i) ? [id, {generateNext: {probabilities: true, options: full}}] : id);
    const results = await sequence.controlledEvaluate(input);
    const logprobs = [];
    for (const i of row.positions) {
        const p = results[i]?.next?.probabilities?.get(row.ids[i + 1]);
        logprobs.push(p === undefined || p <= 0 ? null : Math.log(p));
    }
    answer.nll.push(logprobs);
}
answer.seconds.nll = (Date.now() - t0) / 1000;

await context.dispose();
await model.dispose();
await llama.dispose();
process.stdout.write(JSON.stringify(answer));
