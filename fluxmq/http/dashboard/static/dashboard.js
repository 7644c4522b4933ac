// fluxmq dashboard: one plain script, no dependencies. Every figure comes from the admin API of the
// origin that served this page, called with the admin token (Authorization: Bearer). The token is
// kept in sessionStorage: it lives as long as the tab and is never written anywhere else.
"use strict";

(() => {
  const TOKEN_KEY = "fluxmq.admin.token";
  const POLL_MS = 2000; // overview figures and charts
  const CHART_POINTS = 90; // 3 minutes at POLL_MS
  const MONITOR_ROWS = 500; // newest first; older rows are dropped from the page
  const PAGE = 1000; // sessions per page (the API's default)

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let pollTimer = null;
  let activeTab = "overview";

  // -- DOM helpers: data is always set as text, never parsed as HTML ------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  // On a phone the tables stack each row as a card; every cell carries its column's name for that.
  function labelCells(tbody, rows) {
    const headings = [...tbody.closest("table").querySelectorAll("thead th")].map((th) => th.textContent);
    for (const row of rows || tbody.rows) {
      [...row.cells].forEach((cell, i) => { if (headings[i]) cell.dataset.label = headings[i]; });
    }
  }

  function emptyRow(tbody, columns, text) {
    tbody.replaceChildren(el("tr", {}, el("td", { class: "empty", colSpan: columns, text })));
  }

  let toastTimer = null;
  function toast(text, bad) {
    const box = $("toast");
    box.textContent = text;
    box.className = bad ? "bad" : "";
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.hidden = true; }, 4000);
  }

  // -- formatting --------------------------------------------------------------------------------

  const number = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return `${value >= 100 || unit === 0 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
  }

  function duration(seconds) {
    const s = Math.floor(seconds);
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (d) return `${d}d ${h}h ${m}m`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s % 60}s`;
    return `${s}s`;
  }

  const rate = (r) => (r >= 100 ? Math.round(r).toLocaleString("en-US") : r.toFixed(1));
  const protocols = { 0: "HTTP stream", 3: "MQTT 3.1", 4: "MQTT 3.1.1", 5: "MQTT 5.0" };

  // -- the API -----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status; // 0: no answer at all
    }
  }

  // The parsed JSON answer; with { stream: true } the Response itself (for the monitor's events).
  async function api(path, options) {
    const { stream, ...init } = Object.assign({ cache: "no-store" }, options || {});
    init.headers = Object.assign({ Authorization: `Bearer ${token}` }, init.headers || {});
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, "the admin API did not answer (is the node running, and server.admin.addr set?)");
    }
    if (stream) {
      if (!response.ok) throw new ApiError(response.status, await errorText(response));
      return response;
    }
    const text = await response.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (err) { body = null; }
    if (!response.ok) throw new ApiError(response.status, (body && body.error) || response.statusText);
    return body;
  }

  async function errorText(response) {
    try { return (await response.json()).error || response.statusText; } catch (err) { return response.statusText; }
  }

  const enc = encodeURIComponent;

  // A wrong token (401) or an API that is gone ends the session on the error screen; any other
  // error (a 409 for a client that already left, a 403 for a call the node refuses) is a toast.
  function failed(err, what) {
    if (err && err.name === "AbortError") return;
    if (err instanceof ApiError && (err.status === 401 || err.status === 0 || err.status === 421 || err.status === 502
        || err.status === 503 || err.status === 504)) {
      showError(err);
      return;
    }
    toast(`${what}: ${err.message}`, true);
  }

  // -- screens -----------------------------------------------------------------------------------

  function show(screen) {
    for (const id of ["login", "error", "app"]) $(id).hidden = id !== screen;
  }

  function showLogin() {
    stopPolling();
    stopMonitor();
    show("login");
    $("token").value = "";
    $("token").focus();
  }

  function showError(err) {
    stopPolling();
    stopMonitor();
    let title;
    let hint;
    if (err.status === 401 || err.status === 403) {
      title = "The admin token was refused";
      hint = "Check the token: the first line of server.admin.token_file, or FLUXMQ_ADMIN_TOKEN. "
        + "A SIGHUP or POST /reload may have rotated it.";
    } else if (err.status === 421) {
      title = "This address is not allowed";
      hint = "Open the dashboard by IP address or localhost, or add the name to server.admin.allowed_hosts.";
    } else {
      title = "The admin API is not available";
      hint = "The node may be stopped or restarting, or the admin API is turned off (server.admin.addr).";
    }
    $("error-title").textContent = title;
    $("error-detail").textContent = err.status ? `${err.status}: ${err.message}` : err.message;
    $("error-hint").textContent = hint;
    $("error-retry").hidden = err.status === 401; // the same token would be refused again
    show("error");
  }

  async function signIn(candidate) {
    token = candidate;
    try {
      const stats = await api("/stats");
      sessionStorage.setItem(TOKEN_KEY, token);
      show("app");
      renderStats(stats);
      startPolling();
      openTab(activeTab);
    } catch (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      showError(err instanceof ApiError ? err : new ApiError(0, String(err)));
    }
  }

  // -- overview ----------------------------------------------------------------------------------

  const samples = []; // {t, received, sent, connections}
  const series = { in: [], out: [], conn: [] };

  function startPolling() {
    stopPolling();
    pollTimer = setInterval(poll, POLL_MS);
  }

  function stopPolling() {
    if (pollTimer !== null) clearInterval(pollTimer);
    pollTimer = null;
  }

  let polls = 0;

  async function poll() {
    polls += 1;
    try {
      renderStats(await api("/stats"));
    } catch (err) {
      failed(err, "stats");
      return;
    }
    // The client list follows the node too, while it fits one page (a long list is paged by hand).
    if (activeTab === "clients" && !clientsNext && polls % 3 === 0) loadClients(false);
  }

  function renderStats(s) {
    $("node-version").textContent = `v${s.version}`;
    $("stat-uptime").textContent = duration(s.uptime_seconds);
    $("stat-connections").textContent = number(s.connections.current);
    $("stat-connections-total").textContent = `${number(s.connections.total)} since start`;
    $("stat-sessions").textContent = number(s.sessions.total);
    $("stat-sessions-detail").textContent = `${number(s.sessions.connected)} connected, ${number(s.sessions.offline)} offline`;
    $("stat-subscriptions").textContent = number(s.subscriptions);
    $("stat-retained").textContent = number(s.retained_messages);
    $("stat-memory").textContent = bytes(s.memory ? s.memory.rss_bytes : null);
    const st = s.storage || {};
    $("stat-storage").textContent = st.type === "lmdb" ? bytes(st.used_bytes) : "in memory";
    $("stat-storage-detail").textContent = st.type === "lmdb"
      ? `lmdb, ${bytes(st.map_size)} map${st.refusing ? " — FULL, refusing" : ""}` : "nothing is kept on disk";
    $("stat-sync").textContent = st.sync || "—";
    $("stat-queued").textContent = number(s.queues.messages);
    $("stat-inflight").textContent = `${bytes(s.queues.bytes)}, ${number(s.queues.inflight)} in flight`;
    $("stat-dropped").textContent = number(s.messages.dropped);

    const now = performance.now();
    const last = samples[samples.length - 1];
    samples.push({ t: now, received: s.messages.received, sent: s.messages.sent });
    if (samples.length > 2) samples.shift();
    if (last) {
      const dt = Math.max((now - last.t) / 1000, 0.001);
      push(series.in, Math.max(0, (s.messages.received - last.received) / dt));
      push(series.out, Math.max(0, (s.messages.sent - last.sent) / dt));
    }
    push(series.conn, s.connections.current);
    const tail = (a) => (a.length ? a[a.length - 1] : null);
    $("rate-in").textContent = tail(series.in) === null ? "–" : rate(tail(series.in));
    $("rate-out").textContent = tail(series.out) === null ? "–" : rate(tail(series.out));
    $("rate-conn").textContent = number(tail(series.conn));
    drawChart($("chart-in"), series.in, $("chart-in-max"), rate);
    drawChart($("chart-out"), series.out, $("chart-out-max"), rate);
    drawChart($("chart-conn"), series.conn, $("chart-conn-max"), number);
  }

  function push(list, value) {
    list.push(value);
    if (list.length > CHART_POINTS) list.shift();
  }

  // A line chart in SVG: the newest point at the right edge, the y axis from 0 to a rounded maximum.
  function drawChart(svg, values, maxLabel, format) {
    const NS = "http://www.w3.org/2000/svg";
    const width = 600;
    const height = 170;
    const top = Math.max(...values, 0);
    const scaleMax = niceCeiling(top * 1.2); // headroom: a steady value sits below the top edge
    svg.replaceChildren();
    for (const fraction of [0.25, 0.5, 0.75]) {
      const y = height * fraction;
      const grid = document.createElementNS(NS, "line");
      grid.setAttribute("class", "grid");
      grid.setAttribute("x1", "0"); grid.setAttribute("x2", String(width));
      grid.setAttribute("y1", String(y)); grid.setAttribute("y2", String(y));
      svg.append(grid);
    }
    maxLabel.textContent = `max ${format(scaleMax)}`;
    const windowLabel = svg.parentElement.querySelector(".window");
    windowLabel.textContent = values.length < 2 ? "collecting…" : `last ${duration(((values.length - 1) * POLL_MS) / 1000)}`;
    if (values.length < 2) return;
    // Until the window is full the samples there are span the width (the label says how long).
    const step = width / (values.length - 1);
    const x0 = 0;
    const points = values.map((v, i) => `${(x0 + i * step).toFixed(1)},${(height - 4 - (v / scaleMax) * (height - 8)).toFixed(1)}`);
    const area = document.createElementNS(NS, "polygon");
    area.setAttribute("class", "area");
    area.setAttribute("points", `${x0.toFixed(1)},${height} ${points.join(" ")} ${width},${height}`);
    const line = document.createElementNS(NS, "polyline");
    line.setAttribute("class", "line");
    line.setAttribute("points", points.join(" "));
    svg.append(area, line);
  }

  function niceCeiling(value) {
    if (value <= 1) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const m of [1, 2, 5, 10]) if (m * power >= value) return m * power;
    return 10 * power;
  }

  // -- clients -----------------------------------------------------------------------------------

  let clients = [];
  let clientsNext = null;
  let detailClient = null;

  async function loadClients(more) {
    const params = new URLSearchParams({ limit: String(PAGE) });
    if ($("clients-connected").checked) params.set("connected", "true");
    if (more && clientsNext) params.set("after", clientsNext);
    try {
      const page = await api(`/sessions?${params}`);
      clients = more ? clients.concat(page.sessions) : page.sessions;
      clientsNext = page.next || null;
      $("clients-more").hidden = !clientsNext;
      renderClients(page.total);
    } catch (err) {
      failed(err, "clients");
    }
  }

  function renderClients(total) {
    const query = $("client-search").value.trim().toLowerCase();
    const shown = clients.filter((c) => !query || [c.client_id, c.username, c.peer]
      .some((v) => v && v.toLowerCase().includes(query)));
    const tbody = $("clients-body");
    if (total !== undefined) tbody.dataset.total = String(total);
    $("clients-count").textContent = `${number(shown.length)} shown of ${number(Number(tbody.dataset.total || 0))}`
      + (clientsNext ? " (more to load)" : "");
    if (!shown.length) {
      emptyRow(tbody, 9, clients.length ? "No client matches the search." : "No sessions.");
      return;
    }
    tbody.replaceChildren(...shown.map((c) => el("tr", { "data-client": c.client_id },
      el("td", {}, el("button", { type: "button", class: "link client-id", text: c.client_id,
        onclick: () => openClient(c.client_id) })),
      el("td", {}, el("span", { class: c.connected ? "pill on" : "pill", text: c.connected ? "connected" : "offline" })),
      el("td", { class: "wide", text: c.connected ? (c.listener === "admin_monitor" ? "monitor" : protocols[c.protocol_version] || "?") : "–" }),
      el("td", { class: "wide mono", text: c.peer || "–" }),
      el("td", { class: "wide", text: c.username || "–" }),
      el("td", { class: "num", text: number(c.subscriptions) }),
      el("td", { class: "num", text: number(c.inflight) }),
      el("td", { class: "num", text: number(c.queue_depth) }),
      el("td", {}, c.connected ? el("button", { type: "button", class: "danger disconnect", text: "Disconnect",
        onclick: () => disconnect(c.client_id) }) : null))));
    labelCells(tbody);
  }

  async function disconnect(clientId) {
    if (!window.confirm(`Disconnect ${clientId}? Its will message is published.`)) return;
    try {
      await api(`/sessions/${enc(clientId)}/disconnect`, { method: "POST" });
      toast(`Disconnected ${clientId}`);
    } catch (err) {
      failed(err, `disconnect ${clientId}`);
    }
    await loadClients(false);
    if (detailClient === clientId) openClient(clientId, true);
  }

  async function openClient(clientId, quiet) {
    detailClient = clientId;
    const box = $("client-detail");
    try {
      const s = await api(`/sessions/${enc(clientId)}`);
      const subs = s.subscriptions.length
        ? el("table", {}, el("thead", {}, el("tr", {}, ...["Filter", "QoS", "Options"].map((h) => el("th", { text: h })))),
          el("tbody", {}, ...s.subscriptions.map((sub) => el("tr", {},
            el("td", { class: "topic", text: sub.filter }), el("td", { text: String(sub.qos) }),
            el("td", { class: "muted", text: subscriptionOptions(sub) })))))
        : el("p", { class: "muted", text: "No subscriptions." });
      const inflight = s.inflight.length
        ? el("table", {}, el("thead", {}, el("tr", {}, ...["Packet id", "Topic", "QoS"].map((h) => el("th", { text: h })))),
          el("tbody", {}, ...s.inflight.map((m) => el("tr", {}, el("td", { text: String(m.packet_id) }),
            el("td", { class: "topic", text: m.topic }), el("td", { text: `${m.qos}${m.released ? " (released)" : ""}` })))))
        : el("p", { class: "muted", text: "Nothing in flight." });
      box.replaceChildren(
        el("button", { type: "button", class: "close", text: "Close", onclick: () => { box.hidden = true; detailClient = null; } }),
        el("h3", { class: "mono", text: s.client_id }),
        el("p", { class: "muted", text: [
          s.connected ? `connected from ${s.peer || "?"} (${protocols[s.protocol_version] || "?"})` : "offline",
          s.username ? `user ${s.username}` : "anonymous",
          s.persistent ? `persistent, expiry ${s.expiry_interval === null ? "never" : `${s.expiry_interval}s`}` : "clean",
          `queue ${number(s.queue_depth)} (${bytes(s.queue_bytes)})`,
          s.will ? `will on ${s.will.topic}` : "no will",
        ].join(" · ") }),
        el("h3", { text: `Subscriptions (${s.subscriptions.length})` }), subs,
        el("h3", { text: `In flight (${s.inflight_count})` }), inflight);
      box.hidden = false;
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        box.hidden = true; // a clean session ends with its connection
        if (!quiet) toast(`${clientId} has no session any more`);
        return;
      }
      failed(err, `session ${clientId}`);
    }
  }

  function subscriptionOptions(sub) {
    const options = [];
    if (sub.share_group) options.push(`shared ${sub.share_group}`);
    if (sub.no_local) options.push("no local");
    if (sub.retain_as_published) options.push("retain as published");
    if (sub.retain_handling) options.push(`retain handling ${sub.retain_handling}`);
    if (sub.subscription_id) options.push(`id ${sub.subscription_id}`);
    return options.join(", ") || "–";
  }

  // -- subscriptions by filter -------------------------------------------------------------------

  let filters = [];
  let subsTotal = 0;

  async function loadSubscriptions() {
    try {
      const page = await api("/subscriptions?limit=10000");
      subsTotal = page.total;
      const byFilter = new Map();
      for (const sub of page.subscriptions) {
        const entry = byFilter.get(sub.filter) || { filter: sub.filter, clients: [], qos: 0 };
        entry.clients.push(sub.client_id);
        entry.qos = Math.max(entry.qos, sub.qos);
        byFilter.set(sub.filter, entry);
      }
      filters = [...byFilter.values()].sort((a, b) => b.clients.length - a.clients.length || a.filter.localeCompare(b.filter));
      renderSubscriptions(page.subscriptions.length);
    } catch (err) {
      failed(err, "subscriptions");
    }
  }

  function renderSubscriptions(read) {
    const query = $("sub-search").value.trim().toLowerCase();
    const shown = filters.filter((f) => !query || f.filter.toLowerCase().includes(query)
      || f.clients.some((c) => c.toLowerCase().includes(query)));
    const tbody = $("subs-body");
    if (read !== undefined) tbody.dataset.read = String(read);
    const partial = Number(tbody.dataset.read || 0) < subsTotal ? ` (the first ${number(Number(tbody.dataset.read))} read)` : "";
    $("subs-count").textContent = `${number(shown.length)} filters, ${number(subsTotal)} subscriptions${partial}`;
    if (!shown.length) {
      emptyRow(tbody, 4, filters.length ? "No filter matches the search." : "No subscriptions.");
      return;
    }
    tbody.replaceChildren(...shown.map((f) => el("tr", {},
      el("td", { class: "topic", text: f.filter }),
      el("td", { class: "num", text: number(f.clients.length) }),
      el("td", { class: "num", text: String(f.qos) }),
      el("td", { class: "mono", text: f.clients.slice(0, 5).join(", ") + (f.clients.length > 5 ? ` and ${f.clients.length - 5} more` : "") }))));
    labelCells(tbody);
  }

  // -- retained messages -------------------------------------------------------------------------

  let retainedBytes = null;
  let payloadView = "text";

  async function loadRetained() {
    const filter = $("retained-filter").value.trim() || "#";
    try {
      const page = await api(`/retained?${new URLSearchParams({ filter, limit: "1000" })}`);
      $("retained-count").textContent = `${number(page.messages.length)} of ${number(page.total)}`;
      const list = $("retained-list");
      if (!page.messages.length) {
        list.replaceChildren(el("li", { class: "empty", text: "No retained message matches." }));
        return;
      }
      list.replaceChildren(...page.messages.map((m) => el("li", {}, el("button", {
        type: "button", "data-topic": m.topic, onclick: (event) => showRetained(m, event.currentTarget),
      }, el("span", { class: "topic", text: m.topic }), el("span", { class: "size", text: bytes(m.size) })))));
    } catch (err) {
      failed(err, "retained messages");
    }
  }

  function payloadBytes(m) {
    if (m.payload_encoding === "base64") {
      const raw = atob(m.payload);
      return Uint8Array.from(raw, (ch) => ch.charCodeAt(0));
    }
    return new TextEncoder().encode(m.payload);
  }

  function showRetained(m, button) {
    for (const b of document.querySelectorAll("#retained-list button.selected")) b.classList.remove("selected");
    button.classList.add("selected");
    retainedBytes = payloadBytes(m);
    $("retained-topic").textContent = m.topic;
    const props = m.properties || {};
    $("retained-meta").textContent = [`${bytes(m.size)}`, `QoS ${m.qos}`,
      m.payload_encoding === "base64" ? "binary (not UTF-8)" : "UTF-8 text",
      props.content_type ? `content type ${props.content_type}` : null].filter(Boolean).join(" · ");
    $("retained-view").hidden = false;
    renderPayload();
  }

  function renderPayload() {
    $("view-text").classList.toggle("active", payloadView === "text");
    $("view-hex").classList.toggle("active", payloadView === "hex");
    if (retainedBytes === null) return;
    $("retained-payload").textContent = payloadView === "hex" ? hexDump(retainedBytes)
      : new TextDecoder("utf-8", { fatal: false }).decode(retainedBytes);
  }

  // 16 bytes a line: offset, the bytes in hex, and the printable ASCII.
  function hexDump(data) {
    if (!data.length) return "(empty payload)";
    const lines = [];
    for (let offset = 0; offset < data.length; offset += 16) {
      const chunk = data.subarray(offset, offset + 16);
      const hex = Array.from(chunk, (b) => b.toString(16).padStart(2, "0")).join(" ");
      const ascii = Array.from(chunk, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : ".")).join("");
      lines.push(`${offset.toString(16).padStart(8, "0")}  ${hex.padEnd(47)}  ${ascii}`);
    }
    return lines.join("\n");
  }

  // -- live topic monitor (GET /monitor: server-sent events read with fetch, so the token is sent) --

  let monitorAbort = null;

  function stopMonitor() {
    if (monitorAbort) monitorAbort.abort();
    monitorAbort = null;
    $("monitor-toggle").textContent = "Watch";
    $("monitor-toggle").classList.add("primary");
  }

  async function startMonitor() {
    const filter = $("monitor-filter").value.trim() || "#";
    const params = new URLSearchParams({ filter, retained: $("monitor-retained").checked ? "true" : "false" });
    const abort = new AbortController();
    monitorAbort = abort;
    $("monitor-toggle").textContent = "Stop";
    $("monitor-toggle").classList.remove("primary");
    $("monitor-state").textContent = `connecting to ${filter}…`;
    try {
      const response = await api(`/monitor?${params}`, { stream: true, signal: abort.signal,
        headers: { Accept: "text/event-stream" } });
      $("monitor-state").textContent = `watching ${filter}`;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          handleEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
      if (monitorAbort === abort) $("monitor-state").textContent = "the stream ended";
    } catch (err) {
      if (err.name === "AbortError") return;
      $("monitor-state").textContent = "not watching";
      failed(err, "monitor");
    } finally {
      if (monitorAbort === abort) stopMonitor();
    }
  }

  function handleEvent(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (!data.length) return; // a comment (the stream's heartbeat)
    const body = JSON.parse(data.join("\n"));
    if (event === "close") {
      $("monitor-state").textContent = `closed by the broker: ${body.reason}`;
      return;
    }
    addMonitorRow(body);
  }

  function addMonitorRow(m) {
    const tbody = $("monitor-body");
    if (tbody.querySelector("td.empty")) tbody.replaceChildren();
    let text;
    if (m.payload_encoding === "base64") {
      const data = payloadBytes(m);
      text = `[${data.length} bytes] ${hexDump(data.subarray(0, 32)).split("\n").map((l) => l.slice(10, 58).trim()).join(" ")}${data.length > 32 ? " …" : ""}`;
    } else {
      text = m.payload.length > 300 ? `${m.payload.slice(0, 300)} …` : m.payload;
    }
    const row = el("tr", { class: "monitor-row" },
      el("td", { class: "mono", text: new Date().toLocaleTimeString("en-GB") }),
      el("td", { class: "topic", text: m.topic }),
      el("td", { class: "num", text: String(m.qos) }),
      el("td", { class: "wide", text: m.retain ? "retained" : "" }),
      el("td", { class: "payload-cell", text }));
    tbody.prepend(row);
    labelCells(tbody, [row]);
    while (tbody.rows.length > MONITOR_ROWS) tbody.deleteRow(-1);
  }

  // -- queues and cluster ------------------------------------------------------------------------

  async function loadCluster() {
    try {
      const status = await api("/cluster/status");
      $("cluster-status").replaceChildren(...Object.entries(status).flatMap(([key, value]) => [
        el("dt", { text: key.replace(/_/g, " ") }), el("dd", { text: String(value) })]));
    } catch (err) {
      failed(err, "cluster status");
    }
  }

  // -- tabs and wiring ---------------------------------------------------------------------------

  const loaders = {
    overview: poll, clients: () => loadClients(false), subscriptions: loadSubscriptions,
    retained: loadRetained, monitor: () => {}, cluster: loadCluster,
  };

  function openTab(name) {
    activeTab = name;
    for (const button of document.querySelectorAll("#tabs button")) {
      button.classList.toggle("active", button.dataset.tab === name);
    }
    for (const section of document.querySelectorAll("main .tab")) section.hidden = section.id !== `tab-${name}`;
    loaders[name]();
  }

  function wire() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      signIn($("token").value.trim());
    });
    $("error-retry").addEventListener("click", () => (token ? signIn(token) : showLogin()));
    $("error-login").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); token = ""; showLogin(); });
    $("logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); token = ""; showLogin(); });
    for (const button of document.querySelectorAll("#tabs button")) {
      button.addEventListener("click", () => openTab(button.dataset.tab));
    }
    $("client-search").addEventListener("input", () => renderClients());
    $("clients-connected").addEventListener("change", () => loadClients(false));
    $("clients-refresh").addEventListener("click", () => loadClients(false));
    $("clients-more").addEventListener("click", () => loadClients(true));
    $("sub-search").addEventListener("input", () => renderSubscriptions());
    $("subs-refresh").addEventListener("click", loadSubscriptions);
    $("retained-form").addEventListener("submit", (event) => { event.preventDefault(); loadRetained(); });
    $("view-text").addEventListener("click", () => { payloadView = "text"; renderPayload(); });
    $("view-hex").addEventListener("click", () => { payloadView = "hex"; renderPayload(); });
    $("monitor-form").addEventListener("submit", (event) => {
      event.preventDefault();
      if (monitorAbort) stopMonitor(); else startMonitor();
    });
    $("monitor-clear").addEventListener("click", () => { emptyRow($("monitor-body"), 5, "Waiting for messages."); });
    emptyRow($("monitor-body"), 5, "Choose a filter and press Watch.");
  }

  document.addEventListener("DOMContentLoaded", () => {
    wire();
    if (token) signIn(token); else showLogin();
  });
})();
