// The microphone's AudioWorklet processor ("mic-capture"): gathers the input's render quanta
// (128 frames each) into blocks of `blockSize` frames, mixes them to mono and posts each block
// to the main thread as a Float32Array (its buffer transferred, not copied).
//
// processorOptions: {blockSize} (frames at the AudioContext's rate; default 20 ms at 48 kHz).

class MicCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.blockSize = options?.processorOptions?.blockSize ?? 960;
    this.block = new Float32Array(this.blockSize);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // no input connected (yet)
    const frames = channels[0].length;
    for (let i = 0; i < frames; i++) {
      let sum = 0;
      for (let c = 0; c < channels.length; c++) sum += channels[c][i];
      this.block[this.filled++] = sum / channels.length;
      if (this.filled === this.blockSize) {
        this.port.postMessage(this.block, [this.block.buffer]);
        this.block = new Float32Array(this.blockSize);
        this.filled = 0;
      }
    }
    return true; // keep processing until the node is disconnected and the context closed
  }
}

registerProcessor("mic-capture", MicCapture);
