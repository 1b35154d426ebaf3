"""The batch keys a Hugging Face model takes as inputs (labels and sample indices are not among them);
encoder-decoder batches (src.data.seq2seq) carry the decoder's inputs too."""

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids", "decoder_attention_mask")
