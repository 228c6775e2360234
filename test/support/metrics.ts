/** Reading a service's Prometheus exposition in tests. */

/** Value of the first sample whose name and labels match (labels as a substring test). */
export function sample(text: string, name: string, ...labels: string[]): number | undefined {
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (labels.every((l) => line.includes(l))) return Number(line.slice(line.lastIndexOf(" ") + 1));
  }
  return undefined;
}

/** GET /metrics of the service at `url`; throws unless it answers 200 in the text format. */
export async function scrape(url: string): Promise<string> {
  const res = await fetch(`${url}/metrics`);
  if (res.status !== 200 || !res.headers.get("content-type")?.includes("text/plain")) {
    throw new Error(`GET ${url}/metrics answered ${res.status} ${res.headers.get("content-type")}`);
  }
  return res.text();
}
