// The retrac web page: pick an index, upload (or generate) an image, show two methods' galleries side by side.
// Plain browser JavaScript talking to the /v1 API; no build step.
"use strict";

const API = "v1";
const $ = (id) => document.getElementById(id);

function headers() {
  const key = $("api_key").value.trim();
  localStorage.setItem("retrac-api-key", key);
  return key ? { "X-API-Key": key } : {};
}

async function call(path, options = {}) {
  const response = await fetch(`${API}/${path}`, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

const classesOf = {};  // index name -> its label mapping (class-conditional) or null
const textual = {};  // index name -> whether its model is text-conditional (queries give a prompt)
const defaultsOf = {};  // index name -> { estimator, methods (served, the measured best first) }

function showDefaults() {
  // the index's defaults, as a query naming none gets them: the estimator, and the galleries' methods
  // (the best it serves beside ReTrac under the matched estimator; the paper's two under the paper's)
  const chosen = defaultsOf[$("index").value];
  if (!chosen) return;
  const { estimator, methods } = chosen;
  $("estimator").value = estimator;
  const paper = estimator === "paper" && methods.includes("tracin");
  const first = paper ? "tracin" : methods[0];
  const second = paper ? "retrac" : (methods.find((m) => m !== first && m === "retrac") || methods.find((m) => m !== first) || first);
  const [left, right] = document.querySelectorAll(".method-choice");
  left.value = first;
  right.value = second;
}

function showLabels() {
  // a class-conditional index needs the query's label; an unconditional one takes none
  const classes = classesOf[$("index").value];
  const chosen = $("label").value;  // kept when the new list has it (a reload of the same index)
  $("label-field").hidden = !classes;
  $("label").replaceChildren(...Object.entries(classes || {}).map(([name, value]) =>
    new Option(name === String(value) ? name : `${name} (${value})`, name)));
  if (classes && chosen in classes) $("label").value = chosen;
  $("prompt-field").hidden = !textual[$("index").value];
}

function modelNote(index) {  // what its gradients are over, when not a whole model's
  const parameters = index.parameters;
  if (parameters?.adapters) return `, LoRA rank ${parameters.adapters[0].r}: ${parameters.count} parameters`;
  return parameters?.patterns.length ? `, ${parameters.count} parameters` : "";
}

async function loadIndexes() {
  const { data } = await (await call("indexes")).json();
  const select = $("index");
  const chosen = select.value;  // kept when still ready (a reload after the API key changed)
  select.replaceChildren();
  for (const index of data) {
    classesOf[index.name] = index.classes;
    textual[index.name] = index.text_conditional;
    defaultsOf[index.name] = { estimator: index.estimator, methods: index.methods };
    const done = index.progress.reduce((sum, c) => sum + c.done, 0);
    const total = index.progress.reduce((sum, c) => sum + c.total, 0);
    const option = new Option(
      index.complete ? `${index.name} (${index.num_samples} samples${modelNote(index)})` : `${index.name} (building ${Math.floor(100 * done / total)}%)`,
      index.name);
    option.disabled = !index.complete;
    select.append(option);
  }
  const ready = [...select.options].find((o) => o.value === chosen && !o.disabled)
    || [...select.options].find((o) => !o.disabled);
  if (ready) select.value = ready.value;
  showLabels();
  showDefaults();
  say(data.length ? "" : "No index yet: create one with POST /v1/indexes (see the API documentation).");
}

async function thumbnail(index, sampleId) {
  const path = sampleId.split("/").map(encodeURIComponent).join("/");  // ids are relative paths: 2/0084.png
  const response = await call(`indexes/${encodeURIComponent(index)}/samples/${path}?size=80`);
  return URL.createObjectURL(await response.blob());
}

function card(index, influence, shared) {
  const element = document.createElement("figure");
  element.className = "card" + (shared ? " shared" : "");
  element.dataset.sampleId = influence.sample_id;
  element.dataset.rank = influence.rank;
  const image = document.createElement("img");
  image.alt = influence.sample_id;
  thumbnail(index, influence.sample_id).then((url) => { image.src = url; }).catch(() => { image.alt = "(no image)"; });
  const caption = document.createElement("figcaption");
  caption.innerHTML = `<div class="id"></div><div class="score"></div><div class="t"></div>`;
  caption.querySelector(".id").textContent = `#${influence.rank} ${influence.sample_id}`;
  caption.querySelector(".score").textContent = influence.score.toPrecision(3);
  caption.querySelector(".t").textContent = `t = ${influence.timesteps.join(", ")}`;
  element.title = `per-checkpoint contributions: ${influence.contributions.map((v) => v.toPrecision(3)).join(", ")}`
    + (shared ? "\nalso a proponent under the other method" : "");
  element.append(image, caption);
  return element;
}

function render(index, answer) {
  const result = answer.data[0];
  const proponentIds = Object.fromEntries(Object.entries(result.methods).map(
    ([method, ranking]) => [method, new Set(ranking.proponents.map((i) => i.sample_id))]));
  const chosen = [...document.querySelectorAll(".method")].map((section) => section.dataset.method);
  for (const section of document.querySelectorAll(".method")) {
    const method = section.dataset.method;
    const other = chosen.find((name) => name !== method);
    for (const gallery of section.querySelectorAll(".gallery")) {
      const kind = gallery.dataset.kind;
      const list = result.methods[method] ? result.methods[method][kind] : [];
      gallery.replaceChildren(...list.map((influence) => card(index, influence,
        kind === "proponents" && proponentIds[other] && proponentIds[other].has(influence.sample_id))));
      addBands(gallery, list);
    }
  }
  const t = answer.timings;
  const label = (answer.label === null ? "" : `, label ${answer.label}`)
    + (answer.prompt === null ? "" : `, prompt "${answer.prompt}"`);
  $("timings").textContent = `${answer.estimator} estimator, K = ${answer.timesteps}, M = ${answer.draws}${label}, checkpoints ${answer.checkpoints.join(", ")}: `
    + `${t.total_s.toFixed(2)} s (waiting for other queries ${t.wait_s.toFixed(2)} s, query gradients ${t.gradient_s.toFixed(2)} s, ${answer.search} search ${t.scan_s.toFixed(3)} s over ${answer.dtype} rows)`;
}

async function attribute(event) {
  event.preventDefault();
  const index = $("index").value;
  const file = $("image").files[0];
  if (!index || !file) { say("Pick an index and an image first.", true); return; }
  await attributeFile(index, file, classesOf[index] ? $("label").value : null);
}

async function attributeFile(index, file, label) {
  // `label`: the class the image is attributed under (null for an unconditional index)
  const form = new FormData();
  form.append("images", file, file.name);
  // the matched estimator runs with the index's own K, M and seed (its shared-noise slots)
  const matched = $("estimator").value === "matched";
  for (const field of matched ? ["top_k"] : ["top_k", "timesteps", "draws", "seed"]) form.append(field, $(field).value);
  form.append("estimator", $("estimator").value);
  form.append("search", $("search").value);
  if (label !== null) form.append("label", label);
  if (textual[index]) form.append("prompt", $("prompt").value);  // "" is the empty prompt, sent as such
  // each gallery's chosen method (tracin, retrac, trak, dtrak), asked once
  for (const section of document.querySelectorAll(".method")) section.dataset.method = section.querySelector(".method-choice").value;
  const methods = new Set([...document.querySelectorAll(".method")].map((section) => section.dataset.method));
  for (const method of methods) form.append("methods", method);
  $("run").disabled = true;
  say("Computing the query's gradients and scanning the index…");
  try {
    const answer = await (await call(`indexes/${encodeURIComponent(index)}/attribute/upload`, { method: "POST", body: form })).json();
    render(index, answer);
    say(`Done: ${index}.`);
    document.body.dataset.state = "done";
  } catch (error) {
    say(error.message, true);
    document.body.dataset.state = "error";
  } finally {
    $("run").disabled = false;
  }
}

async function generateQuery() {
  // sample one image from the index's model, make it the query, attribute it under its label
  const index = $("index").value;
  if (!index) { say("Pick an index first.", true); return; }
  const body = { count: 1, label: classesOf[index] ? $("label").value : null, seed: Number($("sampling_seed").value) };
  if ($("guidance_scale").value !== "") body.guidance_scale = Number($("guidance_scale").value);
  $("generate").disabled = true;
  say("Generating a query from the index's model…");
  try {
    const request = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    const { data: [made] } = await (await call(`indexes/${encodeURIComponent(index)}/generate`, request)).json();
    const bytes = Uint8Array.from(atob(made.png_base64), (c) => c.charCodeAt(0));
    const file = new File([bytes], `generated-${made.seed}.png`, { type: "image/png" });
    const files = new DataTransfer();
    files.items.add(file);
    $("image").files = files.files;
    preview();
    const guidance = made.guidance_scale === null ? "no guidance" : `guidance ${made.guidance_scale}`;
    const label = made.label === null ? "" : `label ${made.label}, `;
    $("preview-caption").textContent = `generated: ${label}${guidance}, ${made.sampler} ${made.steps} steps, seed ${made.seed}, checkpoint ${made.checkpoint}`;
    await attributeFile(index, file, made.label);
  } catch (error) {
    say(error.message, true);
    document.body.dataset.state = "error";
  } finally {
    $("generate").disabled = false;
  }
}

// --- timestep bands: each card's score split into coarse / middle / fine query timesteps ---------

const BANDS = ["coarse", "middle", "fine"];

function bandsView(bands) {
  const total = BANDS.reduce((sum, band) => sum + Math.abs(bands[band]), 0) || 1;
  const element = document.createElement("div");
  element.className = "bands";
  element.title = "score by query timestep band (coarse: t >= 2T/3, composition; fine: t < T/3, texture): "
    + BANDS.map((band) => `${band} ${bands[band].toPrecision(3)}`).join(", ");
  for (const band of BANDS) {
    const part = document.createElement("span");
    part.className = `band ${band}` + (bands[band] < 0 ? " negative" : "");
    part.style.width = `${(100 * Math.abs(bands[band]) / total).toFixed(1)}%`;
    element.append(part);
  }
  return element;
}

function addBands(gallery, list) {
  gallery.querySelectorAll(".card").forEach((element, i) => element.append(bandsView(list[i].bands)));
}

function preview() {
  const file = $("image").files[0];
  $("query-view").hidden = !file;
  $("preview-caption").textContent = "query";
  if (file) $("preview").src = file.name.endsWith(".npy") ? "" : URL.createObjectURL(file);
}

$("api_key").value = localStorage.getItem("retrac-api-key") || "";
$("query").addEventListener("submit", attribute);
$("image").addEventListener("change", preview);
$("generate").addEventListener("click", generateQuery);
$("index").addEventListener("change", () => { showLabels(); showDefaults(); });
$("api_key").addEventListener("change", () => loadIndexes().catch((error) => say(error.message, true)));
loadIndexes().catch((error) => say(error.message, true));
