// Workflows saved before the samplers' expert knobs moved to a "UG Sampler Options" node store their values after
// the daily knobs (a UG KSampler with 23 widget values instead of 13). The frontend restores widget values by
// position and drops the ones without a widget, which would silently run such a file with the defaults. Before a
// workflow is configured, this extension moves those values (and a link into the old guidance_vae socket) to a new
// UG Sampler Options node connected to the sampler's "options" input, so the file means what it meant.
import { app } from "../../scripts/app.js";

// The expert widgets in the order an earlier release stored them after the daily ones (headless/ui_to_api.py
// LEGACY_WIDGETS; nodes/sampler_nodes.py LEGACY_LAYOUT), with their defaults.
const EXPERT = [
  ["schedule", "constant"], ["backward_optimizer", "adam"], ["backward_early_stop", 0.0], ["jacobian", true],
  ["smoothing", 0.0], ["smoothing_samples", 0], ["smoothing_reduction", "mean"], ["max_step", 10.0],
  ["cfg_branch", "combined"], ["low_memory", "auto"],
];
const LEGACY_LOW_MEMORY = new Map([[true, "on"], [false, "off"]]);
// Number of widget values the samplers store now (the KSampler's seed carries "control after generate" too).
const DAILY_VALUES = { UniversalGuidanceKSampler: 13, UniversalGuidanceSampler: 7 };
const OPTIONS_TYPE = "UniversalGuidanceSamplerOptions";

function linkList(graph) {
  return Array.isArray(graph.links) ? graph.links : null;
}

function linkId(link) {
  return Array.isArray(link) ? link[0] : link.id;
}

function migrateNode(graph, node) {
  const keep = DAILY_VALUES[node.type];
  const values = node.widgets_values;
  if (keep === undefined || !Array.isArray(values) || values.length <= keep) return false;
  const inputs = node.inputs || [];
  if (inputs.some((i) => i.name === "options")) return false; // already the new layout
  const links = linkList(graph);
  if (!links) return false;
  const old = values.slice(keep);
  const expert = EXPERT.map(([name, def], i) => {
    let v = i < old.length ? old[i] : def;
    if (name === "low_memory" && LEGACY_LOW_MEMORY.has(v)) v = LEGACY_LOW_MEMORY.get(v);
    return v;
  });
  node.widgets_values = values.slice(0, keep);
  const vaeSlot = inputs.findIndex((i) => i.name === "guidance_vae");
  const vaeLink = vaeSlot >= 0 ? inputs[vaeSlot].link : null;
  const changed = expert.some((v, i) => v !== EXPERT[i][1]) || vaeLink != null;
  // The sampler's sockets as the new layout has them: "options" where "guidance_vae" was (or at the end).
  const optionsSlot = vaeSlot >= 0 ? vaeSlot : inputs.length;
  const socket = { name: "options", type: "UG_SAMPLER_OPTIONS", link: null };
  if (vaeSlot >= 0) inputs[vaeSlot] = socket; else inputs.push(socket);
  node.inputs = inputs;
  if (!changed) return false;  // all defaults: the sampler without options means the same
  const id = (graph.last_node_id || Math.max(0, ...graph.nodes.map((n) => n.id))) + 1;
  graph.last_node_id = id;
  const newLink = (graph.last_link_id || Math.max(0, ...links.map(linkId))) + 1;
  graph.last_link_id = newLink;
  if (links.length && !Array.isArray(links[0])) {  // schema version 1: links as objects
    links.push({ id: newLink, origin_id: id, origin_slot: 0, target_id: node.id, target_slot: optionsSlot,
                 type: "UG_SAMPLER_OPTIONS" });
  } else {
    links.push([newLink, id, 0, node.id, optionsSlot, "UG_SAMPLER_OPTIONS"]);
  }
  socket.link = newLink;
  const optionsInputs = [{ name: "guidance_vae", type: "VAE", link: vaeLink }];
  if (vaeLink != null) {
    for (const l of links) {
      if (linkId(l) !== vaeLink) continue;
      if (Array.isArray(l)) { l[3] = id; l[4] = 0; } else { l.target_id = id; l.target_slot = 0; }
    }
  }
  const pos = node.pos || [0, 0];
  graph.nodes.push({
    id, type: OPTIONS_TYPE, pos: [pos[0] - 380, pos[1] + 40], size: [340, 300], flags: {}, order: 0, mode: 0,
    inputs: optionsInputs,
    outputs: [{ name: "options", type: "UG_SAMPLER_OPTIONS", links: [newLink], slot_index: 0 }],
    properties: { "Node name for S&R": OPTIONS_TYPE }, widgets_values: expert,
  });
  return true;
}

app.registerExtension({
  name: "universal_guidance.options_migration",
  async beforeConfigureGraph(graphData) {
    if (!graphData || !Array.isArray(graphData.nodes)) return;
    const moved = graphData.nodes.filter((n) => migrateNode(graphData, n)).map((n) => n.id);
    if (moved.length) {
      console.info(`Universal Guidance: expert knobs of sampler node(s) ${moved.join(", ")} moved to UG Sampler ` +
                   "Options (a workflow saved before they moved there)");
    }
  },
});
