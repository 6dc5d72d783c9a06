// Cerberus viewer: a plain ES module (no build step) over the server's read-only JSON API.
//
//   GET /api/items                 -> {"items": [{id, name, kind, width, height, mpp}]}
//   GET /api/items/ID              -> {..., dzi, tile_size, overlap, tasks: [{task, classes: [{name, color, count}]}], summary}
//   GET /api/items/ID/image.dzi    -> Deep Zoom image (tiles under image_files/)
//   GET /api/items/ID/overlay_files/LEVEL/COL_ROW.png?hide=TOKENS -> RGBA overlay tiles on the image's DZI grid
//   GET /api/items/ID/object?x=X&y=Y                           -> {"object": null | {task, class, probability, ...}}
//
// OpenSeadragon (vendored under static/openseadragon/) shows the image and, above it, the overlay as a second
// TiledImage whose tile URLs carry the hidden tasks and classes. Hooks for tests and scripts: window.cerberusViewer.

const OSD = window.OpenSeadragon;
const byId = (id) => document.getElementById(id);
const NUMBER = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });
const INTEGER = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

let resolveFirstOverlayTile;
let resolveFirstImageTile;

// What tests (tests/test_view_browser.py) and curious users read: plain values, updated as the page works.
const hooks = {
  viewer: null,             // the OpenSeadragon.Viewer
  item: null,               // the open item, as /api/items/ID returned it
  image: null,              // the image TiledImage
  overlay: null,            // the overlay TiledImage now shown
  hide: "",                 // the hide tokens of the overlay now shown, e.g. "tissue,nuclei:epithelial"
  imageTiles: 0,            // image tiles loaded so far
  overlayTiles: 0,          // overlay tiles loaded so far
  overlayReady: false,      // the current overlay (with the current hide tokens) has every tile it needs and is drawn
  lastObject: undefined,    // the last /object answer's "object" (null where nothing was hit)
  errors: [],               // messages shown in the error box
  firstImageTile: new Promise((resolve) => { resolveFirstImageTile = resolve; }),
  firstOverlayTile: new Promise((resolve) => { resolveFirstOverlayTile = resolve; }),
  /** Level-0 image pixel -> pixel in the viewer element (for clicking a known object). */
  imageToElement(x, y) {
    const p = hooks.image.imageToViewerElementCoordinates(new OSD.Point(x, y));
    return { x: p.x, y: p.y };
  },
  /** Show the level-0 rectangle (x, y, w, h) at once, as large as fits. */
  showRegion(x, y, w, h) {
    hooks.viewer.viewport.fitBounds(hooks.image.imageToViewportRectangle(x, y, w, h), true);
  },
  selectItem: (id) => selectItem(id),
  identify: (x, y) => identify(x, y),
};
window.cerberusViewer = hooks;

const state = { items: [], overlayGeneration: 0, openGeneration: 0, shownErrors: new Set() };

// ---- errors: shown on the page, never thrown --------------------------------------------------------------------
function showError(message) {
  const text = String(message);
  if (state.shownErrors.has(text)) return;
  state.shownErrors.add(text);
  hooks.errors.push(text);
  const box = byId("error");
  const line = document.createElement("p");
  line.textContent = text;
  box.append(line);
  box.hidden = false;
  document.body.dataset.state = "error";
}

window.addEventListener("error", (event) => {
  showError(`Unexpected error: ${event.message || event.error || "unknown"}`);
  event.preventDefault();
});
window.addEventListener("unhandledrejection", (event) => {
  const reason = event.reason;
  showError(`Unexpected error: ${(reason && reason.message) || reason}`);
  event.preventDefault();
});

async function fetchJSON(url) {
  let response;
  try {
    response = await fetch(url, { headers: { Accept: "application/json" } });
  } catch (err) {
    throw new Error(`${url}: the server did not answer (${err.message}); is \`cerberus view\` still running?`);
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = body.error || body.detail || detail;
    } catch {
      /* not JSON: keep the status text */
    }
    throw new Error(`${url}: ${response.status} ${detail}`);
  }
  return response.json();
}

// ---- small DOM helpers ----------------------------------------------------------------------------------------
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style") node.style.cssText = value;
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const slug = (s) => String(s).replace(/[^A-Za-z0-9_-]+/g, "-");
const rgb = (c) => (Array.isArray(c) && c.length >= 3 ? `rgb(${c[0]}, ${c[1]}, ${c[2]})` : "transparent");
const swatch = (color) => el("span", { className: "swatch", style: `background: ${rgb(color)}` });
const fmt = (v, f = NUMBER) => (typeof v === "number" && Number.isFinite(v) ? f.format(v) : "–");

function table(headers, rows, className = "") {
  return el("table", { className },
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((r) => (Array.isArray(r) ? el("tr", {}, ...r.map((c) => el("td", {}, c))) : r))));
}

function classColor(task, name) {
  const t = (hooks.item?.tasks || []).find((x) => x.task === task);
  return t?.classes.find((c) => c.name === name)?.color;
}

// ---- items --------------------------------------------------------------------------------------------------------
function renderPicker(items) {
  const picker = byId("item-picker");
  const select = byId("item-select");
  select.replaceChildren(...items.map((it) => el("option", { value: it.id }, `${it.name} (${it.kind})`)));
  picker.hidden = items.length < 2;
  select.addEventListener("change", () => selectItem(select.value));
}

async function selectItem(id) {
  const generation = ++state.openGeneration;
  document.body.dataset.state = "loading";
  let item;
  try {
    item = await fetchJSON(`/api/items/${encodeURIComponent(id)}`);
  } catch (err) {
    showError(err.message);
    return;
  }
  if (generation !== state.openGeneration) return;  // another item was chosen meanwhile
  hooks.item = item;
  byId("item-select").value = item.id;
  byId("item-name").textContent = item.name;
  byId("item-meta").textContent =
    `${item.kind}, ${INTEGER.format(item.width)} × ${INTEGER.format(item.height)} px at ${fmt(item.mpp, new Intl.NumberFormat("en-US", { maximumFractionDigits: 4 }))} µm/px`;
  document.title = `${item.name} – Cerberus viewer`;
  history.replaceState(null, "", `#item=${encodeURIComponent(item.id)}`);
  renderTasks(item);
  renderSummary(item);
  clearObject();
  openImage(item, generation);
}

// ---- layers -------------------------------------------------------------------------------------------------------
function renderTasks(item) {
  const box = byId("tasks");
  if (!item.tasks || item.tasks.length === 0) {
    box.replaceChildren(el("p", { className: "muted" }, "This result holds no objects to overlay."));
    return;
  }
  box.replaceChildren(...item.tasks.map((t) => {
    const total = t.classes.reduce((n, c) => n + (c.count || 0), 0);
    const taskBox = el("input", { type: "checkbox", id: `toggle-${slug(t.task)}`, checked: true,
      dataset: { task: t.task } });
    const classes = t.classes.map((c) => el("li", { className: c.count ? "" : "empty", title: `${t.task}: ${c.name}` },
      el("label", {},
        el("input", { type: "checkbox", id: `toggle-${slug(t.task)}-${slug(c.name)}`, checked: true,
          dataset: { task: t.task, class: c.name } }),
        swatch(c.color), el("span", { className: "name" }, c.name)),
      el("span", { className: "count" }, fmt(c.count, INTEGER))));
    return el("fieldset", { className: "task", dataset: { task: t.task } },
      el("legend", {}, el("label", {}, taskBox, el("span", { className: "name" }, t.task)),
        el("span", { className: "count" }, fmt(total, INTEGER))),
      el("ul", { className: "classes" }, ...classes));
  }));
  box.querySelectorAll("input[type=checkbox]").forEach((input) => input.addEventListener("change", onToggle));
}

function hideTokens() {
  const tokens = [];
  byId("tasks").querySelectorAll("fieldset.task").forEach((fs) => {
    const task = fs.dataset.task;
    const taskBox = fs.querySelector("legend input");
    if (!taskBox.checked) {
      tokens.push(task);
      return;
    }
    fs.querySelectorAll("ul input:not(:checked)").forEach((c) => tokens.push(`${task}:${c.dataset.class}`));
  });
  return tokens;
}

function onToggle() {
  byId("tasks").querySelectorAll("fieldset.task").forEach((fs) => {
    const off = !fs.querySelector("legend input").checked;
    fs.classList.toggle("off", off);
    fs.querySelectorAll("ul input").forEach((c) => { c.disabled = off; });
  });
  refreshOverlay();
}

function opacity() {
  return Number(byId("opacity").value) / 100;
}

byId("opacity").addEventListener("input", () => {
  byId("opacity-value").textContent = `${byId("opacity").value}%`;
  const viewer = hooks.viewer;
  if (!viewer) return;
  for (let i = 0; i < viewer.world.getItemCount(); i++) {
    const ti = viewer.world.getItemAt(i);
    if (ti.source.cerberusOverlay) ti.setOpacity(opacity());
  }
});

// ---- the viewer ---------------------------------------------------------------------------------------------------
function createViewer() {
  const viewer = OSD({
    element: byId("viewer"),
    prefixUrl: "/static/openseadragon/images/",
    drawer: "canvas",                    // same pixels on every machine, GPU or not
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
    timeout: 120000,
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },   // a click identifies an object
    gestureSettingsTouch: { clickToZoom: false, dblClickToZoom: true },
  });
  viewer.addHandler("open-failed", (e) => showError(`Could not open the image: ${e.message} (${e.source})`));
  viewer.addHandler("add-item-failed", (e) => showError(`Could not add a layer: ${e.message}`));
  viewer.addHandler("tile-load-failed", (e) => {
    const what = e.tiledImage?.source?.cerberusOverlay ? "An overlay tile" : "An image tile";
    showError(`${what} could not be loaded (${e.message}): is \`cerberus view\` still running? Its terminal shows the server's errors.`);
  });
  viewer.addHandler("tile-loaded", (e) => {
    if (e.tiledImage?.source?.cerberusOverlay) {
      hooks.overlayTiles += 1;
      resolveFirstOverlayTile(true);
    } else {
      hooks.imageTiles += 1;
      resolveFirstImageTile(true);
    }
  });
  viewer.addHandler("canvas-click", (e) => {
    if (!e.quick || !hooks.image) return;   // a drag, not a click
    const p = hooks.image.viewerElementToImageCoordinates(e.position);
    identify(p.x, p.y);
  });
  hooks.viewer = viewer;
  return viewer;
}

function openImage(item, generation) {
  if (!OSD) {
    showError("OpenSeadragon did not load (static/openseadragon/openseadragon.min.js).");
    return;
  }
  const viewer = hooks.viewer || createViewer();
  hooks.image = null;
  hooks.overlay = null;
  hooks.overlayReady = false;
  state.overlayGeneration += 1;
  viewer.addOnceHandler("open", () => {
    if (generation !== state.openGeneration) return;
    hooks.image = viewer.world.getItemAt(0);
    const size = hooks.image.source.dimensions;
    if (size.x !== item.width || size.y !== item.height) {
      showError(`The image pyramid is ${size.x} × ${size.y} px but the item says ${item.width} × ${item.height}: the overlay may not line up.`);
    }
    document.body.dataset.state = "ready";
    refreshOverlay();
  });
  viewer.open(item.dzi);
}

function overlaySource(item, tokens) {
  const base = `/api/items/${encodeURIComponent(item.id)}/overlay_files/`;
  const encode = (token) => encodeURIComponent(token).replace(/%3A/gi, ":");  // task:class stays readable
  const query = tokens.length ? `?hide=${tokens.map(encode).join(",")}` : "";
  const source = new OSD.TileSource({
    width: item.width,
    height: item.height,
    tileSize: item.tile_size,
    tileOverlap: item.overlap,
    getTileUrl: (level, x, y) => `${base}${level}/${x}_${y}.png${query}`,
  });
  source.cerberusOverlay = true;
  return source;
}

// A new overlay TiledImage with the current hide tokens goes on top; once all its visible tiles are in, the older
// overlays under it go (no blank moment while the new tiles load). Tiles already seen come from OpenSeadragon's
// cache, keyed by URL, so toggling back is instant.
function refreshOverlay() {
  const viewer = hooks.viewer;
  const item = hooks.item;
  if (!viewer || !item || !hooks.image) return;
  const generation = ++state.overlayGeneration;
  const tokens = hideTokens();
  hooks.overlayReady = false;
  document.body.dataset.overlay = "loading";
  viewer.addTiledImage({
    tileSource: overlaySource(item, tokens),
    opacity: opacity(),
    success: ({ item: tiled }) => {
      if (generation !== state.overlayGeneration) {
        viewer.world.removeItem(tiled);
        return;
      }
      hooks.overlay = tiled;
      tiled.whenFullyLoaded(() => {
        if (generation !== state.overlayGeneration) return;
        for (let i = viewer.world.getItemCount() - 1; i >= 0; i--) {
          const other = viewer.world.getItemAt(i);
          if (other !== tiled && other.source.cerberusOverlay) viewer.world.removeItem(other);
        }
        // two frames: the drawer has painted the new overlay alone before the flag says so
        requestAnimationFrame(() => requestAnimationFrame(() => {
          if (generation !== state.overlayGeneration) return;
          hooks.hide = tokens.join(",");
          hooks.overlayReady = true;
          document.body.dataset.overlay = "ready";
        }));
      });
    },
    error: (e) => showError(`Could not add the overlay: ${e.message}`),
  });
}

// ---- click -> object ----------------------------------------------------------------------------------------------
function clearObject() {
  const box = byId("object-info");
  hooks.viewer?.removeOverlay(marker);
  box.dataset.state = "empty";
  delete box.dataset.task;
  delete box.dataset.class;
  box.replaceChildren(el("p", { className: "muted" }, "Click on the image to identify an object."));
  hooks.lastObject = undefined;
}

// a ring where the user clicked, so that the box's object can be told from its neighbours
const marker = el("div", { className: "click-marker", title: "clicked here" });

function placeMarker(x, y) {
  const viewer = hooks.viewer;
  if (!viewer || !hooks.image) return;
  const location = hooks.image.imageToViewportCoordinates(x, y);
  viewer.removeOverlay(marker);
  viewer.addOverlay({ element: marker, location, placement: OSD.Placement.CENTER, checkResize: false });
}

async function identify(x, y) {
  const item = hooks.item;
  const box = byId("object-info");
  if (!item) return;
  const px = Math.floor(x);
  const py = Math.floor(y);
  placeMarker(x, y);
  if (px < 0 || py < 0 || px >= item.width || py >= item.height) {
    box.dataset.state = "outside";
    box.replaceChildren(el("p", { className: "muted" }, "Outside the image."));
    hooks.lastObject = null;
    return;
  }
  box.dataset.state = "loading";
  let answer;
  try {
    answer = await fetchJSON(`/api/items/${encodeURIComponent(item.id)}/object?x=${px}&y=${py}`);
  } catch (err) {
    box.dataset.state = "error";
    box.replaceChildren(el("p", { className: "error" }, err.message));
    return;
  }
  if (item !== hooks.item) return;
  const obj = answer.object;
  const where = `at x ${INTEGER.format(px)}, y ${INTEGER.format(py)} (level-0 px)`;
  hooks.lastObject = obj;
  delete box.dataset.task;
  delete box.dataset.class;
  if (!obj) {
    box.dataset.state = "none";
    box.replaceChildren(el("p", { className: "muted" }, `No object ${where}.`));
    return;
  }
  box.dataset.state = "object";
  box.dataset.task = obj.task;
  box.dataset.class = obj.class ?? "";
  const probability = typeof obj.probability === "number" ? obj.probability.toFixed(3) : "–";
  const rows = [
    ["task", obj.task],
    ["class", el("span", {}, swatch(classColor(obj.task, obj.class)), el("span", { className: "object-class" }, obj.class ?? "–"))],
    ["probability", probability],
    ["area", obj.area_um2 == null ? "–" : `${fmt(obj.area_um2)} µm²`],
    ["parent gland", obj.parent_gland == null ? "–" : String(obj.parent_gland)],
    ["id", obj.id == null ? "–" : String(obj.id)],
  ];
  box.replaceChildren(
    el("table", { className: "kv" }, el("tbody", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))))),
    el("p", { className: "muted" }, where));
}

// ---- summary tables -----------------------------------------------------------------------------------------------
function renderSummary(item) {
  const s = item.summary || {};
  const out = [];
  const mm2 = new Intl.NumberFormat("en-US", { maximumFractionDigits: 3 });
  if (typeof s.analysed_area_um2 === "number") {
    out.push(el("p", {}, `Analysed area: ${fmt(s.analysed_area_um2 / 1e6, mm2)} mm²`));
  }
  // objects per class, grouped by task; classes with none are left out (the layer list shows every class)
  const objectRows = [];
  for (const task of ["gland", "lumen", "nuclei"]) {
    const found = Object.entries(s[task] || {}).filter(([, v]) => v && v.count);
    if (!found.length) continue;
    objectRows.push(el("tr", { className: "group" }, el("th", { colSpan: 4 }, task)));
    for (const [name, v] of found) {
      objectRows.push([el("span", {}, swatch(classColor(task, name)), name), fmt(v.count, INTEGER),
        fmt(v.area_um2), fmt(v.mean_area_um2)]);
    }
  }
  if (objectRows.length) {
    out.push(el("h3", {}, "Objects"), table(["class", "count", "area µm²", "mean µm²"], objectRows, "num"));
  } else if (s.counts && Object.keys(s.counts).length) {
    out.push(el("h3", {}, "Objects"),
      table(["task", "count"], Object.entries(s.counts).map(([k, v]) => [k, fmt(v, INTEGER)]), "num"));
  }
  const tissue = Object.entries(s.tissue || {});
  if (tissue.length) {
    out.push(el("h3", {}, "Tissue"), table(["class", "area mm²", "fraction"], tissue.map(([name, v]) => [
      el("span", {}, swatch(classColor("tissue", name)), name),
      fmt(typeof v.area_um2 === "number" ? v.area_um2 / 1e6 : null, mm2),
      typeof v.fraction === "number" ? `${(100 * v.fraction).toFixed(1)}%` : "–"]), "num"));
  }
  // nuclei per tissue class: rows and columns with no nucleus left out, a total column; scrolls sideways if wide
  const count = (v, c) => (typeof v?.[c]?.count === "number" ? v[c].count : 0);
  const byTissue = Object.entries(s.nuclei_by_tissue || {});
  const nucleusClasses = [...new Set(byTissue.flatMap(([, v]) => Object.keys(v || {})))]
    .filter((c) => byTissue.some(([, v]) => count(v, c) > 0));
  const rows = byTissue.map(([t, v]) => [t, nucleusClasses.map((c) => count(v, c))])
    .filter(([, counts]) => counts.some((n) => n > 0));
  if (rows.length) {
    out.push(el("h3", {}, "Nuclei per tissue class"), el("div", { className: "scroll" },
      table(["tissue", ...nucleusClasses.map((c) => el("span", {}, swatch(classColor("nuclei", c)), c)), "total"],
        rows.map(([t, counts]) => [el("span", {}, swatch(classColor("tissue", t)), t),
          ...counts.map((n) => fmt(n, INTEGER)), fmt(counts.reduce((a, b) => a + b, 0), INTEGER)]), "num")));
  }
  if (!out.length) out.push(el("p", { className: "muted" }, "No summary for this result."));
  byId("summary").replaceChildren(...out);
}

// ---- start --------------------------------------------------------------------------------------------------------
async function main() {
  if (!OSD) {
    showError("OpenSeadragon did not load (static/openseadragon/openseadragon.min.js).");
    return;
  }
  let items;
  try {
    ({ items } = await fetchJSON("/api/items"));
  } catch (err) {
    showError(err.message);
    return;
  }
  state.items = items || [];
  if (!state.items.length) {
    showError("There is nothing to show: the results folder holds no finished result.");
    return;
  }
  renderPicker(state.items);
  const wanted = new URLSearchParams(window.location.hash.slice(1)).get("item");
  const first = state.items.find((it) => it.id === wanted) || state.items[0];
  await selectItem(first.id);
}

main();
