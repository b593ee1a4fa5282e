// Server-Sent Events read from a fetch() body: EventSource cannot POST, so the page parses the
// text/event-stream format itself (the WHATWG rules for the fields it uses: event, data).

/**
 * Feed it text as it arrives, in pieces cut anywhere; it returns the events each piece
 * completed, as {event, data} (event "message" when the server named none; data is the text of
 * the event's data lines joined by "\n", not parsed).
 */
export class SseParser {
  constructor() {
    this.buffer = "";
    this.event = "";
    this.data = [];
  }

  push(text) {
    this.buffer += text;
    const events = [];
    // a line ends at \n, \r\n or \r; a \r at the very end may be half of a \r\n still to come
    const lineEnd = /\r\n|\n|\r(?!$)/g;
    let start = 0;
    let match = lineEnd.exec(this.buffer);
    while (match !== null) {
      const event = this.line(this.buffer.slice(start, match.index));
      if (event) events.push(event);
      start = lineEnd.lastIndex;
      match = lineEnd.exec(this.buffer);
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  /** The stream ended: an event whose blank line never came is dropped, as the standard says. */
  end() {
    const events = this.buffer.endsWith("\r") ? this.push("\n") : [];
    this.buffer = "";
    this.event = "";
    this.data = [];
    return events;
  }

  line(line) {
    if (line === "") {
      if (!this.data.length) {
        this.event = "";
        return null;
      }
      const event = { event: this.event || "message", data: this.data.join("\n") };
      this.event = "";
      this.data = [];
      return event;
    }
    if (line.startsWith(":")) return null; // a comment: a keep-alive
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    return null; // id and retry mean nothing to a one-shot POST
  }
}
