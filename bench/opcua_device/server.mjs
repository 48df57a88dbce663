// The OPC UA bench device of bench/tag_server.py, on node-opcua (native-speed I/O, like a PLC's server) instead of
// asyncua. Started by bench/tags.py (TagServer, device "node"):
//
//     node bench/opcua_device/server.mjs --modules DIR --machines 650 --port 4840 [--state-hz 0.05] [--pki DIR]
//                                        [--sampled]
//
// DIR is the folder where node-opcua was npm-installed (bench/tags.py installs it into the bench cache, never into
// the repository); node-opcua is ESM, so it is imported from there by path.
//
// Same device as bench/tag_server.py's "opcua": variables ns=2;s=m{i}.good, .scrap, .rework (UInt32) and .state
// (String, running / stopped) under objects ns=2;s=m{i}; the counters of machine i change at 1 + i % 10 Hz (all
// three on each tick of that machine, per-machine phase), the state toggles every 1 / state-hz s; a 10 ms tick; each
// change is written with SourceTimestamp = the time of the change (JavaScript Date: whole milliseconds, truncated).
// Security None, anonymous, listening on 127.0.0.1. Prints "READY <port> ns=<index>" when serving; runs until SIGTERM.
//
// Server limits opened up so that the client's request is what counts: publishing intervals down to 10 ms, queues up
// to node-opcua's 5000, notifications per publish unlimited (node-opcua caps "0 = no limit" at 1000), 20 sessions.
//
// Sampling. The asyncua device reports every write at once whatever sampling interval is asked (asyncua's server has
// no sampling timers). node-opcua samples a Value item that asks for an interval > 0 with a timer, and that timer is
// expensive in JavaScript: 2,600 items at 50 ms (52,000 reads/s) took ~64 % of a core, against ~14 % for the same
// items served on change. So, like the asyncua device, every Value item on a bench variable (namespace "bench",
// MinimumSamplingInterval 0) is served exception-based: node-opcua's own on-change path, where a change is queued at
// once and further changes within the revised sampling interval are folded into one (the latest) at its end; with a
// requested 0 every change goes out (MinSupportedSampleRate 0). At this schedule (a variable changes at most every
// 100 ms) nothing is folded at sampling intervals up to 100 ms: the client gets every change as it happens, as with
// the asyncua device. Done by re-marking the item in MonitoredItem#setNode / #_set_parameters (node-opcua decides
// exception-based only for a requested 0); --sampled keeps node-opcua's timer sampling instead.

import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";
import path from "node:path";
import { performance } from "node:perf_hooks";

const TICK_MS = 10;

function parseArgs(argv) {
    const out = { stateHz: 1.0, pki: null, sampled: false };
    const rest = [...argv];
    while (rest.length) {
        const name = rest.shift();
        if (name === "--sampled") {
            out.sampled = true;
            continue;
        }
        const value = rest.shift();
        if (value === undefined) throw new Error(`missing value for ${name}`);
        if (name === "--modules") out.modules = value;
        else if (name === "--machines") out.machines = parseInt(value, 10);
        else if (name === "--port") out.port = parseInt(value, 10);
        else if (name === "--state-hz") out.stateHz = parseFloat(value);
        else if (name === "--pki") out.pki = value;
        else throw new Error(`unknown argument ${name}`);
    }
    if (!out.modules || !out.machines || !out.port) throw new Error("--modules, --machines and --port are required");
    return out;
}

// bench/tag_server.py's Schedule, same arithmetic: counters at 1 + i % 10 Hz, state at stateHz, per-machine phase
class Schedule {
    constructor(machines, stateHz) {
        const now = performance.now() / 1000;
        this.period = Array.from({ length: machines }, (_, i) => 1.0 / (1 + (i % 10)));
        this.nextCount = this.period.map((p, i) => now + ((i % 97) / 97) * p);
        this.statePeriod = stateHz > 0 ? 1.0 / stateHz : 0.0;
        this.nextState = Array.from({ length: machines }, (_, i) => now + ((i % 89) / 89) * (this.statePeriod || 1));
    }

    due(now) {
        const counts = [], states = [];
        const nc = this.nextCount, ns = this.nextState, per = this.period, sp = this.statePeriod;
        for (let i = 0; i < nc.length; i++) {
            if (nc[i] <= now) {
                counts.push(i);
                nc[i] += per[i];
                if (nc[i] <= now) nc[i] = now + per[i]; // fell behind: no bursts
            }
            if (sp && ns[i] <= now) {
                states.push(i);
                ns[i] += sp;
                if (ns[i] <= now) ns[i] = now + sp;
            }
        }
        return [counts, states];
    }
}

async function main() {
    const args = parseArgs(process.argv.slice(2));
    const require = createRequire(path.join(path.resolve(args.modules), "package.json"));
    const ua = await import(pathToFileURL(require.resolve("node-opcua")).href);
    const { OPCUAServer, OPCUACertificateManager, SecurityPolicy, MessageSecurityMode, DataType, Variant, StatusCodes,
        Subscription, MonitoredItem, AttributeIds } = ua;

    Subscription.minimumPublishingInterval = 10;
    Subscription.maxNotificationPerPublishHighLimit = 1_000_000;
    MonitoredItem.minimumSamplingInterval = 10;

    const pki = args.pki || path.join(path.resolve(args.modules), "pki");
    const server = new OPCUAServer({
        port: args.port,
        host: "127.0.0.1",
        hostname: "127.0.0.1",
        securityPolicies: [SecurityPolicy.None],
        securityModes: [MessageSecurityMode.None],
        allowAnonymous: true,
        maxConnectionsPerEndpoint: 20,
        serverCertificateManager: new OPCUACertificateManager({
            rootFolder: path.join(pki, "server"), automaticallyAcceptUnknownCertificate: true }),
        userCertificateManager: new OPCUACertificateManager({
            rootFolder: path.join(pki, "user"), automaticallyAcceptUnknownCertificate: true }),
        serverCapabilities: {
            maxSessions: 20,
            maxSubscriptionsPerSession: 10,
            maxMonitoredItems: 1_000_000,
            maxMonitoredItemsPerSubscription: 100_000,
            minSupportedSampleRate: 0,
        },
        buildInfo: { productName: "edge-gateway bench device (node-opcua)" },
    });
    await server.initialize();
    const addressSpace = server.engine.addressSpace;
    const ns = addressSpace.registerNamespace("urn:edge-gateway:bench");
    if (!args.sampled) {
        const onChange = (item) => {
            const node = item.node;
            if (node && item.itemToMonitor.attributeId === AttributeIds.Value && node.nodeId.namespace === ns.index &&
                node.minimumSamplingInterval === 0) {
                item._exceptionBased = true;
            }
        };
        const setNode = MonitoredItem.prototype.setNode;
        MonitoredItem.prototype.setNode = function (node) {
            setNode.call(this, node);
            onChange(this);
        };
        const setParameters = MonitoredItem.prototype._set_parameters;
        MonitoredItem.prototype._set_parameters = function (parameters) {
            setParameters.call(this, parameters);
            onChange(this); // a ModifyMonitoredItems: node-opcua re-decides the mode here
        };
    }
    const objects = addressSpace.rootFolder.objects;
    const rows = [];
    for (let i = 0; i < args.machines; i++) {
        const obj = ns.addObject({ organizedBy: objects, nodeId: `s=m${i}`, browseName: `m${i}` });
        const row = [];
        for (const sig of ["good", "scrap", "rework"]) {
            row.push(ns.addVariable({
                componentOf: obj, nodeId: `s=m${i}.${sig}`, browseName: sig, dataType: "UInt32",
                minimumSamplingInterval: 0, value: new Variant({ dataType: DataType.UInt32, value: 0 }),
            }));
        }
        row.push(ns.addVariable({
            componentOf: obj, nodeId: `s=m${i}.state`, browseName: "state", dataType: "String",
            minimumSamplingInterval: 0, value: new Variant({ dataType: DataType.String, value: "running" }),
        }));
        rows.push(row);
    }
    await server.start();
    process.stdout.write(`READY ${args.port} ns=${ns.index}\n`);

    const counters = new Array(args.machines).fill(0);
    const state = new Array(args.machines).fill("running");
    const sched = new Schedule(args.machines, args.stateHz);
    const good = StatusCodes.Good;
    let timer = null;
    const tick = () => {
        const [counts, states] = sched.due(performance.now() / 1000);
        const ts = new Date();
        for (const i of counts) {
            counters[i] = (counters[i] + 1) >>> 0;
            const row = rows[i];
            for (let k = 0; k < 3; k++) {
                row[k].setValueFromSource(new Variant({ dataType: DataType.UInt32, value: counters[i] }), good, ts);
            }
        }
        for (const i of states) {
            state[i] = state[i] === "running" ? "stopped" : "running";
            rows[i][3].setValueFromSource(new Variant({ dataType: DataType.String, value: state[i] }), good, ts);
        }
        timer = setTimeout(tick, TICK_MS); // like the asyncua device: sleep a tick after the work
    };
    timer = setTimeout(tick, TICK_MS);

    let stopping = false;
    const stop = async () => {
        if (stopping) return;
        stopping = true;
        clearTimeout(timer);
        try {
            await server.shutdown(0);
        } finally {
            process.exit(0);
        }
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
}

main().catch((err) => {
    process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
});
