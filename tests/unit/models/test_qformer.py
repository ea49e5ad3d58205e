"""Q-Former passes and masks, BERT initialisation, parity with transformers' retrieval model."""

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from blip2_train.config import QFormerConfig
from blip2_train.models.qformer import QFormer, itg_mask

VISION_WIDTH, VOCAB = 48, 120


def tiny_cfg(**kw):
    cfg = OmegaConf.structured(QFormerConfig(bert=None, hidden_size=32, num_hidden_layers=4,
                                             num_attention_heads=4, intermediate_size=64,
                                             num_query_tokens=8, embed_dim=16, **kw))
    return cfg


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return QFormer(tiny_cfg(**kw), vision_width=VISION_WIDTH, vocab_size=VOCAB).eval()


def inputs(batch=3, length=7, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, tokens, VISION_WIDTH, generator=g)
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 5:] = 0
    return image, ids, mask


def test_itg_mask_text_token_only_changes_later_positions():
    model = make_model()
    image, ids, mask = inputs()
    embeds = model.encode_image(image)
    t = 3
    ids2 = ids.clone()
    ids2[:, t] = (ids2[:, t] + 7) % VOCAB
    q = model.num_query_tokens
    with torch.no_grad():
        a = model.joint_forward(embeds, ids, itg_mask(mask, q))
        b = model.joint_forward(embeds, ids2, itg_mask(mask, q))
    # queries and text positions before t are unchanged, position t and later do change
    assert torch.allclose(a[:, : q + t], b[:, : q + t], atol=1e-6)
    assert (a[:, q + t] - b[:, q + t]).abs().max() > 1e-3
    assert (a[:, q + t + 1] - b[:, q + t + 1]).abs().max() > 1e-3


def test_itg_query_outputs_equal_query_only_pass():
    """Queries never see text under the ITG mask, so the joint pass serves ITC's image side."""
    model = make_model()
    image, ids, mask = inputs()
    embeds = model.encode_image(image)
    with torch.no_grad():
        joint = model.joint_forward(embeds, ids, itg_mask(mask, model.num_query_tokens))
        alone = model.query_forward(embeds)
    assert torch.allclose(joint[:, : model.num_query_tokens], alone, atol=1e-5)


def test_text_pass_ignores_image_and_padding():
    model = make_model()
    _, ids, mask = inputs()
    with torch.no_grad():
        out = model.text_forward(ids, mask)
        ids2 = ids.clone()
        ids2[1, 6] = 3  # a padded position of row 1
        out2 = model.text_forward(ids2, mask)
    assert torch.allclose(out[1, :5], out2[1, :5], atol=1e-6)


def test_itm_logits_average_over_queries():
    """ITM logits = the mean over the Q query outputs of the ITM head (LAVIS: ``itm_head(vl_embeddings)
    .mean(dim=1)`` over ``output_itm.last_hidden_state[:, :Q]``), from the full joint pass."""
    from blip2_train.models.qformer import itm_mask

    model = make_model()
    image, ids, mask = inputs()
    with torch.no_grad():
        embeds = model.encode_image(image)
        logits = model.itm_logits(embeds, ids, mask)
        hidden = model.joint_forward(embeds, ids, itm_mask(mask, model.num_query_tokens))  # [B, Q+T, H]
        per_query = model.itm_head(hidden[:, :model.num_query_tokens])  # [B, Q, 2]
    assert logits.shape == (3, 2) and per_query.shape == (3, 8, 2)
    torch.testing.assert_close(logits, per_query.mean(dim=1), rtol=0, atol=1e-6)
    # the queries' outputs differ, so neither one query nor the text positions would give these numbers
    assert (per_query - per_query.mean(dim=1, keepdim=True)).abs().amax() > 1e-3
    assert (logits - per_query[:, 0]).abs().amax() > 1e-4
    text_mean = model.itm_head(hidden[:, model.num_query_tokens:]).mean(dim=1)
    assert (logits - text_mean).abs().amax() > 1e-4


def test_lm_head_tied_to_word_embeddings():
    model = make_model()
    assert model.lm_head.decoder.weight.data_ptr() == model.embeddings.word_embeddings.weight.data_ptr()


def test_temperature_clamp_is_optional():
    model = make_model(temp_clamp=[0.001, 0.5])
    with torch.no_grad():
        model.temp.fill_(1e-5)
    assert abs(model.temperature.item() - 0.001) < 1e-9
    lavis = make_model()
    with torch.no_grad():
        lavis.temp.fill_(1e-5)
    assert abs(lavis.temperature.item() - 1e-5) < 1e-12


def test_bert_init_copies_weights_and_query_ffn(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB - 1, hidden_size=32, num_hidden_layers=4,
                                      num_attention_heads=4, intermediate_size=64))
    bert.save_pretrained(tmp_path)
    model = make_model()
    report = model.load_bert(str(tmp_path))
    sd, src = model.state_dict(), bert.state_dict()
    assert torch.equal(sd["qformer.layernorm.weight"], src["bert.embeddings.LayerNorm.weight"])
    assert torch.equal(sd["qformer.encoder.layer.1.attention.attention.query.weight"],
                       src["bert.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(sd["qformer.encoder.layer.2.intermediate_query.dense.weight"],
                       src["bert.encoder.layer.2.intermediate.dense.weight"])
    assert torch.equal(sd["qformer.encoder.layer.2.output_query.dense.weight"],
                       src["bert.encoder.layer.2.output.dense.weight"])
    # vocabulary grown by one ([DEC]): BERT's rows copied, the new row kept
    assert torch.equal(sd["embeddings.word_embeddings.weight"][: VOCAB - 1],
                       src["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(sd["lm_head.transform.dense.weight"], src["cls.predictions.transform.dense.weight"])
    assert "qformer.encoder.layer.0.crossattention.attention.key.weight" in report["fresh"]
    assert "query_tokens" in report["fresh"]


def test_matches_transformers_retrieval_model():
    """Our ITC/ITM computations equal Blip2ForImageTextRetrieval's for the same weights."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    model = make_model()
    q = model.config.to_dict()
    config = Blip2Config(
        vision_config={"hidden_size": VISION_WIDTH, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "image_size": 16, "patch_size": 8},
        qformer_config=q, num_query_tokens=model.num_query_tokens, image_text_hidden_size=16)
    config.qformer_config.use_qformer_text_input = True
    hf = Blip2ForImageTextRetrieval(config).eval()
    ours = model.state_dict()
    hf_sd = hf.state_dict()
    for key in hf_sd:
        if key.startswith("vision_model.post_layernorm."):
            hf_sd[key] = ours[key.replace("vision_model.post_layernorm.", "ln_vision.")]
        elif key in ours:
            hf_sd[key] = ours[key]
    hf.load_state_dict(hf_sd)
    pixel_values = torch.randn(2, 3, 16, 16)
    _, ids, mask = inputs(batch=2)
    with torch.no_grad():
        vision = hf.vision_model(pixel_values=pixel_values)
        pre_ln = vision.last_hidden_state  # post_layernorm applied = ln_vision
        itm_hf = hf(pixel_values=pixel_values, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        itc_hf = hf(pixel_values=pixel_values, input_ids=ids, attention_mask=mask,
                    use_image_text_matching_head=False)
        image_embeds = pre_ln  # already through post_layernorm (= our ln_vision)
        itm_ours = model.itm_logits(image_embeds, ids, mask)
        image_feats = model.image_features(model.query_forward(image_embeds))
        text_feats = model.text_features(model.text_forward(ids, mask))
        sim = torch.einsum("iqd,td->itq", image_feats, text_feats).amax(-1)
    assert torch.allclose(itm_ours, itm_hf.logits_per_image, atol=1e-5)
    assert torch.allclose(sim, itc_hf.logits_per_image, atol=1e-5)


def test_ln_vision_affine_folded_into_kv_gives_the_same_outputs_and_gradients_without_the_input_gradient():
    """impl=fast: image_states + cross_attention_kv = ln_vision then K/V, the affine folded into the
    projections; same outputs and parameter gradients (ln_vision's included), and the frozen
    tokens' input-gradient products of the K/V projections are gone (counted FLOPs)."""
    image, ids, mask = inputs(tokens=6)
    cfg = tiny_cfg()
    probe = torch.randn(image.shape[0], cfg.num_query_tokens + ids.shape[1], cfg.hidden_size,
                        generator=torch.Generator().manual_seed(2))

    def run(folded: bool, tokens: torch.Tensor):
        model = make_model()  # eval: no dropout, the two runs see the same function
        torch.manual_seed(0)
        with torch.no_grad():  # a non-trivial affine: the init is gamma = 1, beta = 0
            model.ln_vision.weight.uniform_(0.5, 1.5)
            model.ln_vision.bias.normal_(0.0, 0.2)
        with FlopCounterMode(display=False) as counter:
            if folded:
                states = model.image_states(tokens)
                kv = model.cross_attention_kv(states)
            else:
                states = model.encode_image(tokens)
                kv = model.qformer.cross_attention_kv(states)
            out = model.joint_forward(states, ids, itg_mask(mask, model.num_query_tokens), kv)
            (out * probe).sum().backward()  # (a LayerNorm output's square mean would be constant)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return states.requires_grad, out.detach(), grads, counter.get_total_flops()

    states_grad_a, out_a, grads_a, flops_a = run(False, image)
    states_grad_b, out_b, grads_b, flops_b = run(True, image)
    assert states_grad_a and not states_grad_b  # the normalised tokens need none
    assert torch.allclose(out_a, out_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and {"ln_vision.weight", "ln_vision.bias"} <= grads_a.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4), name
    assert grads_a["ln_vision.weight"].abs().max() > 1e-3 and grads_a["ln_vision.bias"].abs().max() > 1e-3
    # unfolded: per cross-attention layer, K and V each take a [B*N, H] x [H, W] input-gradient product
    batch, tokens = image.shape[:2]
    cross_layers = len(make_model().qformer.cross_layers())
    input_grad_flops = cross_layers * 2 * 2 * batch * tokens * cfg.hidden_size * VISION_WIDTH
    # the folding adds only elementwise [H, W] products and matrix-vector products (not counted)
    assert flops_a - flops_b == input_grad_flops > 0

    # an unfrozen encoder (encoder.freeze=false): the tokens' own gradient is the same too
    token_grads = []
    for folded in (False, True):
        tokens = image.clone().requires_grad_(True)
        run(folded, tokens)
        token_grads.append(tokens.grad)
    assert token_grads[0].abs().max() > 1e-4
    assert torch.allclose(token_grads[0], token_grads[1], atol=1e-7, rtol=1e-4)
