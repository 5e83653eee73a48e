// The page of `deeplab serve`: sends an image to POST v1/segment?format=json&overlay=1 and shows the image, the
// overlay, the mask, a legend of the classes with their colours and shares, and the time taken. No libraries.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

function headers() {
  const key = $("key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (e) { /* not JSON: fall through */ }
  return "The service answered " + response.status + " " + response.statusText + ".";
}

async function loadModel() {
  const response = await fetch("v1/model", { headers: headers() });
  if (response.status === 401) {
    $("key-row").hidden = false;
    $("model-line").textContent = "This service needs an API key: enter it below.";
    return;
  }
  if (!response.ok) { showError(await errorText(response)); return; }
  model = await response.json();
  $("model-name").textContent = model.name;
  const size = model.input_size ? model.input_size.join(" x ") : "any size";
  $("model-line").textContent = model.classes.length + " classes, input " + size + ", runtime " + model.runtime + ".";
  $("limits").textContent = "Up to " + (model.limits.max_bytes / 1048576).toFixed(0) + " MB and " +
    (model.limits.max_pixels / 1e6).toFixed(0) + " megapixels.";
}

function legend(result) {
  const body = $("legend").querySelector("tbody");
  body.textContent = "";
  const classes = model ? model.classes : Object.entries(result.classes).map(([i, n]) => ({ index: +i, name: n, color: [0, 0, 0] }));
  for (const c of classes) {
    const share = result.shares[c.name] || 0;
    const row = document.createElement("tr");
    if (!share) row.className = "absent";
    const swatch = document.createElement("td");
    swatch.className = "swatch";
    const box = document.createElement("span");
    box.style.background = "rgb(" + c.color.join(",") + ")";
    swatch.appendChild(box);
    const name = document.createElement("td");
    name.textContent = c.name;
    const pct = document.createElement("td");
    pct.textContent = (100 * share).toFixed(1) + "%";
    row.append(swatch, name, pct);
    body.appendChild(row);
  }
  $("legend-box").hidden = false;
}

async function send(file) {
  $("error").hidden = true;
  if (!file) return;
  if (!model) await loadModel();
  $("status").textContent = "Segmenting " + file.name + "...";
  $("image").src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("image", file);
  let response;
  try {
    response = await fetch("v1/segment?format=json&overlay=1", { method: "POST", body: form, headers: headers() });
  } catch (e) {
    showError("The service could not be reached (" + e.message + ").");
    return;
  }
  if (response.status === 401) $("key-row").hidden = false;
  if (!response.ok) { showError(await errorText(response)); return; }
  const result = await response.json();
  $("overlay").src = "data:image/png;base64," + result.overlay;
  $("mask").src = "data:image/png;base64," + result.mask;
  $("mask-link").href = $("mask").src;
  $("result").hidden = false;
  legend(result);
  $("status").textContent = file.name + ": " + result.width + " x " + result.height + " pixels in " +
    result.ms.toFixed(0) + " ms (" + result.runtime + ").";
}

$("file").addEventListener("change", (e) => send(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  send(e.dataTransfer.files[0]);
});
$("key").addEventListener("change", () => { model = null; loadModel(); });
loadModel();
