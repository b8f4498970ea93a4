// cnsq view: the predicted tiles over their imagery. The server sends only what is in view (the
// tiles near their own zoom, parent squares further out); everything here is drawing and
// recolouring. `window.cnsqView` exposes the page's state for people and tests alike.
"use strict";
(function () {
  const state = {
    summary: null, thresh: 0.5, painted: false, drawn: 0, drawnAbove: 0, parents: 0,
    above: null, total: null, selected: null,
  };
  window.cnsqView = state;

  const $ = (id) => document.getElementById(id);
  // Half zooms: the area fills the map more closely; the server floors the zoom it is given.
  const map = L.map("map", { zoomSnap: 0.5, zoomDelta: 0.5, worldCopyJump: false });
  state.map = map;
  const renderer = L.canvas({ padding: 0.25 });
  const overlay = L.layerGroup().addTo(map);
  const fmt = new Intl.NumberFormat("en");

  // A JSON answer of the local server, or an Error saying what it answered.
  async function getJSON(path) {
    let response;
    try {
      response = await fetch(path);
    } catch (error) {
      throw new Error("cnsq view is not answering (was it stopped?)");
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok && response.status !== 404) {
      throw new Error(body.error || `${path} answered ${response.status}`);
    }
    return body;
  }

  function fail(error) {
    $("status").textContent = String(error.message || error);
    $("status").classList.add("error");
  }

  // The bounds of XYZ tile x/y at zoom z, by Leaflet's own projection (256-pixel tiles).
  function tileBounds(x, y, z) {
    return L.latLngBounds(map.unproject([x * 256, (y + 1) * 256], z),
      map.unproject([(x + 1) * 256, y * 256], z));
  }

  // Yellow at the threshold to red at the top of the score range.
  function ramp(score) {
    const top = Math.max(state.summary.histogram.edges.at(-1) ?? 1, state.thresh);
    const t = top > state.thresh ? Math.min(1, (score - state.thresh) / (top - state.thresh)) : 1;
    const mix = (a, b) => Math.round(a + (b - a) * t);
    return `rgb(${mix(255, 215)},${mix(210, 25)},${mix(63, 28)})`;
  }

  function style(score) {
    if (score >= state.thresh) {
      const colour = ramp(score);
      return { renderer, color: colour, weight: 2, opacity: 1, fillColor: colour, fillOpacity: 0.3 };
    }
    return { renderer, color: "#7fd3ff", weight: 0.7, opacity: 0.6, fillOpacity: 0.02 };
  }

  function countDrawn() {
    let above = 0;
    overlay.eachLayer((layer) => {
      if (layer.options.kind === "tile" && layer.options.score >= state.thresh) above += 1;
    });
    state.drawnAbove = above;
    $("status").textContent =
      `${fmt.format(state.drawn)} tiles drawn (${fmt.format(above)} above), ` +
      `${fmt.format(state.parents)} parent squares, zoom ${Math.floor(map.getZoom())}` +
      (state.truncated ? " — too many to draw: zoom in" : "");
  }

  function recolour() {
    overlay.eachLayer((layer) => layer.setStyle(style(layer.options.score)));
    countDrawn();
  }

  function showTable(title, rows) {
    const info = $("info");
    info.replaceChildren();
    const heading = document.createElement("p");
    heading.innerHTML = "<strong></strong>";
    heading.firstChild.textContent = title;
    const table = document.createElement("table");
    for (const [key, value] of rows) {
      const tr = table.insertRow();
      tr.insertCell().textContent = key;
      tr.insertCell().textContent = value;
    }
    info.append(heading, table);
  }

  async function showTile(x, y, z) {
    const id = `${x}-${y}-${z}`;
    const answer = await getJSON(`/api/tile?id=${id}`);
    if (answer.error) { showTable(id, [["error", answer.error]]); return; }
    state.selected = answer;
    showTable(`Tile ${answer.tile}`, answer.scores.map((s, i) => [
      `score ${i}${i === state.summary.threshInd ? " (thresholded)" : ""}`,
      typeof s === "number" ? s.toPrecision(6) : JSON.stringify(s)]));
  }

  async function refresh() {
    const b = map.getBounds();
    const zoom = map.getZoom();
    const query = new URLSearchParams({
      zoom, west: b.getWest(), south: b.getSouth(), east: b.getEast(), north: b.getNorth(),
    });
    refresh.seq = (refresh.seq || 0) + 1;
    const mine = refresh.seq;
    const answer = await getJSON(`/api/features?${query}`);
    if (mine !== refresh.seq) return; // a newer view asked meanwhile
    overlay.clearLayers();
    for (const [x, y, z, score] of answer.tiles) {
      const box = L.rectangle(tileBounds(x, y, z), { ...style(score), kind: "tile", score });
      box.on("click", () => showTile(x, y, z).catch(fail));
      overlay.addLayer(box);
    }
    for (const [x, y, z, max, mean, count] of answer.parents) {
      const bounds = tileBounds(x, y, z);
      const box = L.rectangle(bounds, { ...style(max), kind: "parent", score: max });
      box.on("click", () => {
        showTable(`${fmt.format(count)} tiles under ${x}-${y}-${z}`,
          [["max score", max.toPrecision(6)], ["mean score", mean.toPrecision(6)]]);
        map.fitBounds(bounds);
      });
      overlay.addLayer(box);
    }
    state.drawn = answer.tiles.length;
    state.parents = answer.parents.length;
    state.truncated = answer.truncated;
    $("status").classList.remove("error");
    countDrawn();
    state.painted = true;
  }

  function drawHistogram() {
    const { edges, counts } = state.summary.histogram;
    const svg = $("histogram");
    svg.replaceChildren();
    if (!counts.length) return;
    const peak = Math.max(...counts) || 1;
    const width = 240 / counts.length;
    const ns = "http://www.w3.org/2000/svg";
    counts.forEach((count, i) => {
      const bar = document.createElementNS(ns, "rect");
      const height = count ? Math.max(1, (count / peak) * 76) : 0;
      bar.setAttribute("x", i * width + 0.5);
      bar.setAttribute("y", 78 - height);
      bar.setAttribute("width", width - 1);
      bar.setAttribute("height", height);
      bar.setAttribute("class", edges[i] >= state.thresh ? "bar above" : "bar");
      const title = document.createElementNS(ns, "title");
      title.textContent = `${edges[i].toFixed(2)}–${edges[i + 1].toFixed(2)}: ${fmt.format(count)}`;
      bar.append(title);
      svg.append(bar);
    });
    const low = edges[0];
    const high = edges.at(-1);
    const at = ((state.thresh - low) / (high - low)) * 240;
    const line = document.createElementNS(ns, "line");
    line.setAttribute("x1", at);
    line.setAttribute("x2", at);
    line.setAttribute("y1", 0);
    line.setAttribute("y2", 80);
    svg.append(line);
    $("histogram-range").textContent = `scores from ${low} to ${high}; ` +
      `${fmt.format(state.summary.total)} tiles`;
  }

  async function updateCount() {
    const asked = state.thresh;
    const answer = await getJSON(`/api/count?thresh=${asked}`);
    if (asked !== state.thresh) return;
    state.above = answer.above;
    state.total = answer.total;
    const count = $("count");
    count.dataset.above = answer.above;
    count.textContent = `${fmt.format(answer.above)} of ${fmt.format(answer.total)} tiles ≥ ${asked}`;
    $("download").href = `/api/geojson?thresh=${encodeURIComponent(asked)}`;
    $("download").setAttribute("download", `cnsq-above-${asked}.geojson`);
  }

  function setThreshold(value) {
    state.thresh = value;
    $("thresh-value").textContent = String(value);
    recolour();
    drawHistogram();
    clearTimeout(setThreshold.timer);
    setThreshold.timer = setTimeout(() => updateCount().catch(fail), 60);
  }

  async function start() {
    const summary = await getJSON("/api/summary");
    state.summary = summary;
    state.thresh = summary.thresh;
    const slider = $("thresh");
    const edges = summary.histogram.edges;
    if (edges.length) {
      slider.min = edges[0];
      slider.max = edges.at(-1);
      slider.step = (edges.at(-1) - edges[0]) / 100;
    }
    slider.value = summary.thresh;
    slider.addEventListener("input", () => setThreshold(Number(slider.value)));
    $("thresh-ind").textContent = `${summary.threshInd} (of ${summary.classes})`;
    $("source").textContent = `${summary.name}` +
      (summary.skipped ? ` (${fmt.format(summary.skipped)} unreadable rows skipped)` : "") +
      (summary.imagery ? ` over ${summary.imagery.name}` : " (no imagery: pass --tile-endpoint)");
    const maxZoom = Math.max(...summary.zooms, 0) + 3;
    map.setMaxZoom(Math.min(maxZoom, 24));
    if (summary.imagery) {
      const { minZoom, maxZoom: nativeMax } = summary.imagery;
      L.tileLayer("/imagery/{z}/{x}/{y}", {
        minNativeZoom: minZoom, maxNativeZoom: Math.min(nativeMax, Math.max(...summary.zooms, 0)),
        minZoom: Math.max(0, minZoom - 2), maxZoom: 24, tileSize: 256,
        attribution: "imagery via cnsq view",
        // A folder or MBTiles holds the run's area only: no requests for tiles it cannot have.
        ...(summary.imagery.local && summary.bounds ? {
          bounds: [[summary.bounds[1], summary.bounds[0]], [summary.bounds[3], summary.bounds[2]]],
        } : {}),
      }).addTo(map);
    }
    if (summary.bounds) {
      const [west, south, east, north] = summary.bounds;
      map.fitBounds([[south, west], [north, east]]);
    } else {
      map.setView([0, 0], 1);
    }
    setThreshold(summary.thresh);
    map.on("moveend", () => refresh().catch(fail));
    await refresh();
  }

  start().catch(fail);
})();
