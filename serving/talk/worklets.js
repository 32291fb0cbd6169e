// The talk page's two audio worklets, run on the browser's audio thread at the context's rate (24 kHz).

// Microphone -> pcm16 blocks of `blockSamples`, posted to the page, which sends them to /v1/realtime.
class Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.size = options.processorOptions.blockSamples;
    this.block = new Int16Array(this.size);
    this.filled = 0;
  }

  process(inputs) {
    const samples = inputs[0][0];
    if (!samples) return true;
    for (let i = 0; i < samples.length; i++) {
      const x = Math.max(-1, Math.min(1, samples[i]));
      this.block[this.filled++] = x < 0 ? x * 32768 : x * 32767;
      if (this.filled === this.size) {
        this.port.postMessage(this.block.buffer, [this.block.buffer]);  // transferred: a new block follows
        this.block = new Int16Array(this.size);
        this.filled = 0;
      }
    }
    return true;
  }
}

// Answer audio -> speaker, through a jitter buffer: playback starts once `jitterSamples` are queued (or the
// answer's audio is complete), so uneven arrival does not open gaps. Tells the page when the first sample
// of an answer plays ("started"), when it ran dry and re-buffers ("underrun"), when it finished
// ("drained") and, on "flush" (barge-in), how much had played ("stopped").
class Player extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.jitter = options.processorOptions.jitterSamples;
    this.reset();
    this.port.onmessage = (e) => this.command(e.data);
  }

  reset() {
    this.queue = [];
    this.offset = 0;
    this.buffered = 0;
    this.played = 0;
    this.playing = false;
    this.begun = false;
    this.ended = false;
  }

  command(m) {
    if (m.type === "push") {
      this.queue.push(m.samples);
      this.buffered += m.samples.length;
    } else if (m.type === "end") {
      this.ended = true;
      if (this.buffered === 0 && this.begun) this.finish();
    } else if (m.type === "flush") {
      this.port.postMessage({ type: "stopped", played: this.played, wasPlaying: this.begun });
      this.reset();
    }
  }

  finish() {
    this.port.postMessage({ type: "drained", played: this.played });
    this.reset();
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.buffered > 0 && (this.buffered >= this.jitter || this.ended)) {
      this.playing = true;
      if (!this.begun) this.port.postMessage({ type: "started" });
      this.begun = true;
    }
    if (!this.playing) return true;
    let i = 0;
    while (i < out.length && this.queue.length) {
      const head = this.queue[0];
      const n = Math.min(out.length - i, head.length - this.offset);
      out.set(head.subarray(this.offset, this.offset + n), i);
      i += n;
      this.offset += n;
      if (this.offset === head.length) { this.queue.shift(); this.offset = 0; }
    }
    this.buffered -= i;
    this.played += i;
    if (this.buffered === 0) {
      if (this.ended) this.finish();
      else { this.playing = false; this.port.postMessage({ type: "underrun", played: this.played }); }
    }
    return true;
  }
}

registerProcessor("capture", Capture);
registerProcessor("player", Player);
