// Runs on the audio thread: turns the microphone's float samples (at the AudioContext's rate, which
// demo.js sets to the rate the server expects) into PCM16 frames of `frameSamples`, and reports the
// frame's RMS level for the meter.
class PcmFrames extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.frameSamples = options.processorOptions.frameSamples;
    this.frame = new Int16Array(this.frameSamples);
    this.filled = 0;
    this.squares = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      const s = Math.max(-1, Math.min(1, channel[i]));
      this.frame[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      this.squares += s * s;
      if (this.filled === this.frameSamples) {
        const level = Math.sqrt(this.squares / this.frameSamples);
        // Transferred, not copied: the buffer is detached here, so the next frame gets a new one.
        this.port.postMessage({ pcm: this.frame.buffer, level }, [this.frame.buffer]);
        this.frame = new Int16Array(this.frameSamples);
        this.filled = 0;
        this.squares = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm-frames", PcmFrames);
