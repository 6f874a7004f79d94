fetch("/api/server")
  .then((response) => response.json())
  .then((server) => {
    document.getElementById("server").textContent = `worker ${server.worker} (pid ${server.pid})`;
  });
