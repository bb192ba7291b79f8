/* corolla web page: a chat with the model and a live map of the swarm that serves it.
 *
 * Plain JavaScript, no libraries, no build step. Talks to the same server that serves this file:
 *   GET  /api/swarm             the swarm's servers and block coverage (polled every 2 s)
 *   GET  /v1/models             the model's name
 *   POST /v1/chat/completions   OpenAI-compatible, streamed as server-sent events; the last chunk
 *                               carries "route": the servers the answer went through.
 */
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const REFRESH_MS = 2000;
  const SWARM_TIMEOUT_MS = 10000;
  const PEER_TAIL = 8;
  const STATES = ["ONLINE", "JOINING", "OFFLINE"];

  // Map geometry (px)
  const PAD_L = 14;
  const PAD_R = 14;
  const CAPTION_H = 20;
  const AXIS_H = CAPTION_H + 26;
  const LANE_H = 40;
  const BAR_H = 28;
  const COVERAGE_GAP = 34;
  const COVERAGE_H = 24;
  const BOTTOM_PAD = 8;
  const LABEL_FONT = '600 12px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';

  const $ = (id) => document.getElementById(id);
  const el = {
    summary: $("swarm-summary"),
    map: $("swarm-map"),
    updated: $("last-updated"),
    routeText: $("route-text"),
    serverRows: $("server-rows"),
    messages: $("messages"),
    hint: $("empty-hint"),
    form: $("chat-form"),
    input: $("chat-input"),
    send: $("send"),
    stop: $("stop"),
    newChat: $("new-chat"),
    model: $("chat-model"),
    temperature: $("temperature"),
    maxTokens: $("max-tokens"),
  };

  const state = {
    swarm: null, // last /api/swarm answer
    swarmError: null, // message of the last failed refresh, if it failed
    lanes: new Map(), // peer_id -> lane, kept between refreshes so bars don't jump
    route: [], // [{peer_id, start, end}] of the last answer
    history: [], // [{role, content}] sent with each request
    controller: null, // AbortController of the answer being streamed
    model: null,
    renderedKey: "",
  };

  // ------------------------------------------------------------------ helpers

  function svg(tag, attrs = {}, parent = null) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function html(tag, className, text, parent = null) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  const peerTail = (peerId) => (peerId.length > PEER_TAIL ? "…" + peerId.slice(-PEER_TAIL) : peerId);
  const serverName = (server) => server.public_name || peerTail(server.peer_id);
  const formatThroughput = (t) => `${Number(t) >= 100 ? Number(t).toFixed(0) : Number(t).toFixed(1)} tok/s`;

  function nameOfPeer(peerId) {
    const server = state.swarm && state.swarm.servers.find((s) => s.peer_id === peerId);
    return server ? serverName(server) : peerTail(peerId);
  }

  /** [3,4,5,9] -> "3-5, 9" */
  function formatRanges(blocks) {
    const parts = [];
    for (let i = 0; i < blocks.length; ) {
      let j = i;
      while (j + 1 < blocks.length && blocks[j + 1] === blocks[j] + 1) j++;
      parts.push(i === j ? `${blocks[i]}` : `${blocks[i]}-${blocks[j]}`);
      i = j + 1;
    }
    return parts.join(", ");
  }

  let measureCtx = null;
  function textWidth(text) {
    if (!measureCtx) {
      measureCtx = document.createElement("canvas").getContext("2d");
      measureCtx.font = LABEL_FONT;
    }
    return measureCtx.measureText(text).width;
  }

  /** The longest of `candidates` that fits in `width` px, else the first one shortened with "…". */
  function fitLabel(candidates, width) {
    for (const c of candidates) if (textWidth(c) <= width) return c;
    const base = candidates[candidates.length - 1];
    for (let n = base.length - 1; n > 0; n--) {
      const cut = base.slice(0, n) + "…";
      if (textWidth(cut) <= width) return cut;
    }
    return "";
  }

  // ------------------------------------------------------------------ swarm map

  /** Each server gets a lane (row) in which no two bars overlap; servers keep their lane when they can. */
  function packLanes(servers) {
    const lanes = []; // lanes[i] = [[start, end], ...]
    const fits = (i, s) => !(lanes[i] || []).some(([a, b]) => s.start < b && a < s.end);
    const put = (i, s) => {
      (lanes[i] = lanes[i] || []).push([s.start, s.end]);
      placed.set(s.peer_id, i);
    };
    const placed = new Map();
    const sorted = [...servers].sort(
      (a, b) => a.start - b.start || b.end - a.end || (a.peer_id < b.peer_id ? -1 : 1),
    );
    for (const s of sorted) {
      const previous = state.lanes.get(s.peer_id);
      if (previous !== undefined && fits(previous, s)) put(previous, s);
    }
    for (const s of sorted) {
      if (placed.has(s.peer_id)) continue;
      let i = 0;
      while (!fits(i, s)) i++;
      put(i, s);
    }
    // drop lanes left empty by servers that are gone
    const used = [...new Set(placed.values())].sort((a, b) => a - b);
    const renumber = new Map(used.map((lane, i) => [lane, i]));
    for (const [peer, lane] of placed) placed.set(peer, renumber.get(lane));
    state.lanes = placed;
    return { lanes: placed, count: used.length };
  }

  function tickStep(blockWidth) {
    for (const step of [1, 2, 5, 10, 20, 25, 50, 100, 200, 500]) if (step * blockWidth >= 26) return step;
    return 1000;
  }

  function renderMap() {
    const swarm = state.swarm;
    const width = Math.max(300, Math.floor(el.map.clientWidth || 600));
    const key = JSON.stringify([swarm, state.route, width, state.swarmError !== null]);
    if (key === state.renderedKey) return;
    state.renderedKey = key;
    el.map.classList.toggle("stale", state.swarmError !== null);
    if (!swarm) return;

    const n = Math.max(1, swarm.num_blocks);
    const servers = swarm.servers.map((s) => ({ ...s, start: Math.max(0, s.start), end: Math.min(n, s.end) }));
    const { lanes, count: laneCount } = packLanes(servers);
    const bw = (width - PAD_L - PAD_R) / n;
    const x = (block) => PAD_L + block * bw;
    const barsTop = AXIS_H + 4;
    const barsH = Math.max(1, laneCount) * LANE_H;
    const coverageTop = barsTop + barsH + COVERAGE_GAP;
    const height = coverageTop + COVERAGE_H + BOTTOM_PAD;
    const laneY = (lane) => barsTop + lane * LANE_H + (LANE_H - BAR_H) / 2;

    const root = svg("svg", {
      width,
      height,
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": `Map of ${swarm.servers.length} servers over ${n} blocks`,
    });

    svg("text", { x: PAD_L, y: 12, class: "map-caption" }, root).textContent = "servers and the blocks they hold";

    // block grid and axis
    const step = tickStep(bw);
    const grid = svg("g", { class: "grid" }, root);
    for (let b = 0; b <= n; b++) {
      const major = b % step === 0 || b === n;
      svg("line", {
        x1: x(b), x2: x(b), y1: AXIS_H - (major ? 6 : 3), y2: barsTop + barsH,
        class: major ? "grid-line major" : "grid-line",
      }, grid);
    }
    const axis = svg("g", { class: "axis" }, root);
    for (let b = 0; b < n; b += step) {
      svg("text", { x: x(b) + bw / 2, y: AXIS_H - 10, "text-anchor": "middle" }, axis).textContent = b;
    }
    if ((n - 1) % step !== 0 && (n - 1 - Math.floor((n - 1) / step) * step) * bw >= 24) {
      svg("text", { x: x(n - 1) + bw / 2, y: AXIS_H - 10, "text-anchor": "middle" }, axis).textContent = n - 1;
    }

    // server bars
    const routePeers = new Set(state.route.map((hop) => hop.peer_id));
    const bars = svg("g", { class: "bars" }, root);
    if (!servers.length) {
      svg("text", { x: width / 2, y: barsTop + LANE_H / 2 + 4, "text-anchor": "middle", class: "no-servers" }, bars)
        .textContent = "No servers found for this model";
    }
    for (const s of servers) {
      const st = STATES.includes(s.state) ? s.state : "OFFLINE";
      const inRoute = routePeers.has(s.peer_id);
      const g = svg("g", {
        class: `server-bar state-${st.toLowerCase()}${inRoute ? " route" : ""}`,
        "data-peer-id": s.peer_id,
        "data-start": s.start,
        "data-end": s.end,
        "data-state": st,
        tabindex: 0,
      }, bars);
      const bx = x(s.start) + 1;
      const bwidth = Math.max(2, (s.end - s.start) * bw - 2);
      const by = laneY(lanes.get(s.peer_id));
      svg("title", {}, g).textContent =
        `${serverName(s)} (${s.peer_id})\nblocks ${s.start}–${s.end - 1} (${s.end - s.start})\n` +
        `${st.toLowerCase()} · ${formatThroughput(s.throughput)} · v${s.version}` +
        (inRoute ? "\nused by the last answer" : "");
      svg("rect", { x: bx, y: by, width: bwidth, height: BAR_H, rx: 5, ry: 5 }, g);
      const label = fitLabel(
        [`${serverName(s)} · ${formatThroughput(s.throughput)}`, serverName(s)],
        bwidth - 12,
      );
      if (label) {
        svg("text", { x: bx + bwidth / 2, y: by + BAR_H / 2 + 4, "text-anchor": "middle" }, g).textContent = label;
      }
    }

    // the last answer's route: each hop's blocks outlined on its server's bar, hops joined at their
    // boundaries (a dashed line across the map marks where one server hands over to the next)
    const hops = state.route.filter((hop) => lanes.has(hop.peer_id));
    if (hops.length) {
      const layer = svg("g", { class: "route-layer" }, root);
      const mid = (hop) => laneY(lanes.get(hop.peer_id)) + BAR_H / 2;
      const hx = (block) => x(Math.min(n, Math.max(0, block)));
      hops.forEach((hop, i) => {
        if (i > 0) {
          svg("line", {
            x1: hx(hop.start), x2: hx(hop.start), y1: AXIS_H - 2, y2: coverageTop + COVERAGE_H + 3,
            class: "route-boundary",
          }, layer);
        }
        svg("rect", {
          x: hx(hop.start) + 1, y: laneY(lanes.get(hop.peer_id)) - 1,
          width: Math.max(2, (Math.min(n, hop.end) - Math.max(0, hop.start)) * bw - 2), height: BAR_H + 2,
          rx: 6, ry: 6, class: "route-span",
        }, layer);
      });
      const points = [];
      hops.forEach((hop, i) => {
        if (i === 0) points.push([hx(hop.start), mid(hop)]);
        const next = hops[i + 1];
        points.push([hx(hop.end), mid(hop)]);
        if (next) points.push([hx(next.start), mid(next)]);
      });
      // joints only: along a bar the outline shows the path, so the line would cross the label
      for (let i = 1; i + 1 < points.length; i += 2) {
        const [[ax, ay], [bx, by]] = [points[i], points[i + 1]];
        if (ax !== bx || ay !== by) {
          svg("path", { d: `M${ax},${ay} L${ax},${(ay + by) / 2} L${bx},${(ay + by) / 2} L${bx},${by}`, class: "route-path" }, layer);
        }
      }
      points.forEach(([px, py], i) => {
        if (i === 0 || i % 2 === 1) svg("circle", { cx: px, cy: py, r: 4.5, class: "route-hop" }, layer);
      });
    }

    // coverage strip: ONLINE servers per block
    const cov = svg("g", { id: "coverage", class: "coverage" }, root);
    svg("text", { x: PAD_L, y: coverageTop - 8, class: "map-caption" }, cov).textContent =
      "online servers per block";
    const counts = swarm.block_counts || [];
    const uncovered = new Set(swarm.uncovered_blocks || counts.flatMap((c, i) => (c ? [] : [i])));
    for (let b = 0; b < n; b++) {
      const c = counts[b] || 0;
      const bad = uncovered.has(b) || c === 0;
      const g = svg("g", {
        class: `block ${bad ? "uncovered" : `covered level-${Math.min(c, 3)}`}`,
        "data-block": b,
        "data-count": c,
      }, cov);
      svg("title", {}, g).textContent = bad ? `block ${b}: no online server` : `block ${b}: ${c} online`;
      svg("rect", { x: x(b) + 0.5, y: coverageTop, width: Math.max(1, bw - 1), height: COVERAGE_H, rx: 2 }, g);
      if (bw >= 14) {
        svg("text", { x: x(b) + bw / 2, y: coverageTop + COVERAGE_H / 2 + 4, "text-anchor": "middle" }, g)
          .textContent = bad ? "×" : c > 9 ? "+" : c;
      }
    }

    el.map.replaceChildren(root);
  }

  function renderSummary() {
    const swarm = state.swarm;
    if (!swarm) {
      el.summary.textContent = state.swarmError ? `Swarm unavailable: ${state.swarmError}` : "connecting to the swarm…";
      el.summary.className = state.swarmError ? "summary bad" : "summary";
      return;
    }
    const online = swarm.servers.filter((s) => s.state === "ONLINE").length;
    const uncovered = swarm.uncovered_blocks || [];
    const coverage = uncovered.length
      ? `${uncovered.length === 1 ? "block" : "blocks"} ${formatRanges(uncovered)} uncovered`
      : `all ${swarm.num_blocks} blocks covered`;
    const model = swarm.model || swarm.dht_prefix;
    el.summary.replaceChildren();
    html("strong", "model-name", model, el.summary);
    el.summary.append(` · ${online} ${online === 1 ? "server" : "servers"} online · `);
    html("span", uncovered.length ? "coverage-bad" : "coverage-ok", coverage, el.summary);
    el.summary.className = `summary ${uncovered.length ? "bad" : "ok"}`;
  }

  function renderServerTable() {
    const swarm = state.swarm;
    if (!swarm) return;
    const rows = swarm.servers.map((s) => {
      const tr = document.createElement("tr");
      for (const cell of [
        serverName(s),
        peerTail(s.peer_id),
        `${s.start}–${s.end - 1}`,
        s.state.toLowerCase(),
        Number(s.throughput).toFixed(1),
        s.version,
      ]) html("td", "", cell, tr);
      tr.className = `state-${String(s.state).toLowerCase()}`;
      return tr;
    });
    el.serverRows.replaceChildren(...rows);
  }

  function renderRouteText() {
    if (!state.route.length) return;
    el.routeText.replaceChildren();
    el.routeText.append("Last answer went through ");
    state.route.forEach((hop, i) => {
      if (i) el.routeText.append(" → ");
      const hopText = html("span", "hop", null, el.routeText);
      html("strong", "", nameOfPeer(hop.peer_id), hopText);
      hopText.append(` (blocks ${hop.start}–${hop.end - 1})`);
    });
  }

  function renderSwarm() {
    renderSummary();
    renderMap();
  }

  async function refreshSwarm() {
    try {
      const resp = await fetch("/api/swarm", { cache: "no-store", signal: AbortSignal.timeout(SWARM_TIMEOUT_MS) });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      const data = await resp.json();
      const changed = JSON.stringify(data) !== JSON.stringify(state.swarm);
      state.swarm = data;
      state.swarmError = null;
      if (!state.model && data.model) setModel(data.model);
      el.updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
      el.updated.classList.remove("stale");
      if (changed) {
        renderServerTable();
        renderRouteText();
      }
    } catch (err) {
      state.swarmError = err.name === "TimeoutError" ? "no answer from the server" : err.message;
      el.updated.textContent = `update failed at ${new Date().toLocaleTimeString()} — retrying`;
      el.updated.classList.add("stale");
    }
    renderSwarm();
    setTimeout(refreshSwarm, REFRESH_MS);
  }

  // ------------------------------------------------------------------ chat

  class ApiError extends Error {}

  async function errorMessage(resp) {
    const fallback = `${resp.status} ${resp.statusText}`.trim();
    let text = "";
    try {
      text = await resp.text();
      const body = JSON.parse(text);
      if (body && body.error) return body.error.message || fallback;
      if (body && body.detail) {
        return typeof body.detail === "string"
          ? body.detail
          : body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
      }
    } catch {
      if (text) return `${fallback}: ${text.slice(0, 300)}`;
    }
    return fallback;
  }

  function setModel(model) {
    state.model = model;
    el.model.textContent = model;
  }

  function nearBottom() {
    const m = el.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 60;
  }

  function scrollToBottom(force) {
    if (force || nearBottom()) el.messages.scrollTop = el.messages.scrollHeight;
  }

  function addMessage(role, text) {
    if (el.hint) el.hint.hidden = true;
    const wrap = html("div", `message ${role}`, null, el.messages);
    wrap.setAttribute("aria-label", role === "user" ? "You" : role === "assistant" ? "Model" : "Error");
    const body = html("div", "body", text, wrap);
    el.messages.appendChild(wrap);
    scrollToBottom(true);
    return { wrap, body };
  }

  function setBusy(busy) {
    el.send.disabled = busy;
    el.stop.disabled = !busy;
    el.form.classList.toggle("busy", busy);
  }

  /** Parse one server-sent event block; returns its data string, or null for comments/empty. */
  function eventData(block) {
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("data:")) data.push(line.slice(line[5] === " " ? 6 : 5));
    }
    return data.length ? data.join("\n") : null;
  }

  async function send() {
    const text = el.input.value.trim();
    if (!text || state.controller) return;
    el.input.value = "";
    addMessage("user", text);
    state.history.push({ role: "user", content: text });

    const { wrap, body } = addMessage("assistant", "");
    wrap.classList.add("streaming");
    wrap.dataset.state = "streaming";
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);

    let content = "";
    let route = null;
    let outcome = "done";
    try {
      if (!state.model) await loadModel();
      const request = { messages: state.history, stream: true };
      if (state.model) request.model = state.model;
      const temperature = parseFloat(el.temperature.value);
      if (temperature >= 0 && temperature <= 2) request.temperature = temperature;
      const maxTokens = parseInt(el.maxTokens.value, 10);
      if (maxTokens >= 1) request.max_tokens = maxTokens;
      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(request),
        signal: controller.signal,
      });
      if (!resp.ok) throw new ApiError(await errorMessage(resp));
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let finished = false;
      while (!finished) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r/g, "");
        let cut;
        while (!finished && (cut = buffer.indexOf("\n\n")) >= 0) {
          const data = eventData(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (data === null) continue;
          if (data.trim() === "[DONE]") {
            finished = true;
            break;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(chunk.error.message || "the server reported an error");
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && typeof delta.content === "string" && delta.content) {
            const follow = nearBottom();
            content += delta.content;
            body.textContent = content;
            scrollToBottom(follow);
          }
          if (Array.isArray(chunk.route)) route = chunk.route;
        }
      }
      if (finished) reader.cancel().catch(() => {});
      if (!content) body.textContent = "(empty answer)";
    } catch (err) {
      if (err.name === "AbortError") {
        outcome = "stopped";
      } else {
        outcome = "error";
        const message =
          err instanceof ApiError
            ? err.message
            : err instanceof SyntaxError
              ? `the server sent something unreadable (${err.message})`
              : `could not reach the server (${err.message})`;
        wrap.classList.add("error");
        body.textContent = content;
        html("div", "error-text", message, wrap).setAttribute("role", "alert");
      }
    } finally {
      state.controller = null;
      setBusy(false);
      wrap.classList.remove("streaming");
      wrap.dataset.state = outcome;
    }

    if (outcome === "stopped") {
      if (!content) body.hidden = true;
      html("div", "meta", content ? "stopped" : "stopped before the answer began", wrap);
    }
    if (content) state.history.push({ role: "assistant", content });
    else if (outcome !== "done") state.history.pop(); // nothing came back: don't resend a dangling question
    if (route && route.length) {
      state.route = route;
      const meta = html("div", "meta route-meta", null, wrap);
      meta.append("via ");
      route.forEach((hop, i) => {
        if (i) meta.append(" → ");
        html("span", "hop", `${nameOfPeer(hop.peer_id)} ${hop.start}–${hop.end - 1}`, meta);
      });
      renderRouteText();
      renderMap();
    }
    scrollToBottom(false);
    el.input.focus({ preventScroll: true });
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.history = [];
    for (const m of [...el.messages.querySelectorAll(".message")]) m.remove();
    if (el.hint) el.hint.hidden = false;
    el.input.focus();
  }

  /** The model's name: /v1/models lists it only while the swarm serves all its blocks, /api/swarm always. */
  async function loadModel() {
    for (const [url, pick] of [
      ["/v1/models", (body) => body.data && body.data.length && body.data[0].id],
      ["/api/swarm", (body) => body.model],
    ]) {
      try {
        const resp = await fetch(url, { cache: "no-store" });
        const name = resp.ok && pick(await resp.json());
        if (name) return setModel(name);
      } catch {
        /* try the next one; the swarm refresh also tells the model */
      }
    }
  }

  // ------------------------------------------------------------------ wiring

  el.form.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  el.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    } else if (e.key === "Escape" && state.controller) {
      state.controller.abort();
    }
  });
  el.stop.addEventListener("click", () => state.controller && state.controller.abort());
  el.newChat.addEventListener("click", newChat);
  if (window.ResizeObserver) new ResizeObserver(() => renderMap()).observe(el.map);

  loadModel();
  refreshSwarm();
  // on a narrow screen the map comes first: focusing the box would scroll past it
  if (window.matchMedia("(min-width: 901px)").matches) el.input.focus({ preventScroll: true });
})();
