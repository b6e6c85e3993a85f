// hm_topk: the Retrieval unit. It keeps the scores of SLOTS queries as they stream in
// (hm_score_mem, a histogram per slot in hm_histogram) and, per command, selects from one slot:
//   top-k (exact, by the kernels' contract: the k largest, ties to the lower index, indices
//   ascending):
//     1. coarse then fine histogram scan from the top finds the bin b* holding the k-th
//        largest score, `above` scores in higher bins, so need = k - above come from b*;
//     2. a bin that holds a single value, or whose every score is needed, gives the threshold
//        T at once (its lowest score); otherwise a scan of the slot's scores, W per cycle,
//        gathers the scores in b*'s range into the candidate buffer (one per cycle), tracking
//        min and max;
//     3. T = the need-th largest candidate, built bit by bit below the common prefix of min
//        and max, each bit one counting pass over the candidates (W per cycle); then one pass
//        counts the candidates above T, which fixes how many ties at T are taken;
//     4. an index-ascending scan of the slot's scores, W per cycle, selects s > T, and s == T
//        while ties are still needed (the lowest indices), so the output is ascending for free.
//   threshold bitmap: the same scan with s >= max - delta, packed 32 candidates to a word.
//   A command selects over the slot's first cmd_n scores (its query's rows); a bitmap row is
//   ceil(cmd_nout / 32) words wide (the call's n), the bits at or past cmd_n zero.
// Every memory reads synchronously (block RAM / UltraRAM): each scan presents the next word's
// address a cycle ahead and holds it while the output stalls.
// Selected indices and bitmap words leave through hm_index_packer as 512-bit beats.
`default_nettype none

module hm_topk #(
    parameter SLOTS = 1,
    parameter NMAX  = 1024,  // rows per slot; a power of two, at least 2 * W
    parameter W     = 64     // scores per scan cycle: 32 .. 512, a power of two
) (
    input wire clk,
    input wire rst,
    input wire clear,  // a new pass: forget histograms and maxima

    input wire                          in_valid,
    input wire [$clog2(NMAX)-1:0]       in_idx,
    input wire [           SLOTS-1:0]   in_mask,
    input wire [        SLOTS*64-1:0]   in_scores,
    input wire [                 1:0]   in_op,     // 0 write, 1 add, 2 max (with the stored)
    input wire                          in_final,  // complete scores: histogram, maximum

    input  wire                           cmd_valid,
    output wire                           cmd_ready,
    input  wire [((SLOTS > 1) ? $clog2(SLOTS) : 1)-1:0] cmd_slot,
    input  wire [          $clog2(NMAX):0] cmd_n,     // scores to select from
    input  wire [          $clog2(NMAX):0] cmd_nout,  // bitmap mode: bits per row (>= cmd_n)
    input  wire [          $clog2(NMAX):0] cmd_k,
    input  wire                           cmd_bitmap,
    input  wire [                   31:0] cmd_delta,
    output reg                            cmd_done,

    input  wire flush,  // emit the partial last beat
    output wire idle,

    output wire [511:0] out_data,
    output wire [  4:0] out_items,
    output wire         out_valid,
    input  wire         out_ready
);
    localparam XW = $clog2(NMAX);
    localparam LW = $clog2(W);
    localparam WA = XW - LW;
    localparam SW = (SLOTS > 1) ? $clog2(SLOTS) : 1;
    localparam [63:0] SIGN = 64'h8000_0000_0000_0000;

    localparam [3:0] S_IDLE = 4'd0, S_PREP = 4'd1, S_COARSE = 4'd2, S_FINE = 4'd3,
                     S_GATHER = 4'd4, S_DECIDE = 4'd6, S_CNT = 4'd7,
                     S_CNT_END = 4'd8, S_LEVEL = 4'd9, S_EMIT = 4'd10, S_DONE = 4'd11;

    reg [3:0] state;

    // -- command registers and selection state --------------------------------------------
    reg  [SW-1:0] sel;
    reg  [  XW:0] n_r;
    reg  [  XW:0] nout_r;
    reg  [  XW:0] k_r;
    reg           bitmap_r;
    reg  [  31:0] delta_r;
    reg  [  63:0] thr;  // signed threshold of bitmap mode

    reg  [   5:0] g;
    reg  [  11:0] b;
    reg  [  XW:0] above;
    reg  [  XW:0] need;
    reg  [  XW:0] c;
    reg  [  XW:0] j;
    reg  [  63:0] vmin;
    reg  [  63:0] vmax;
    reg  [  63:0] tcur;
    reg  [  63:0] cmp_t;
    reg  [   5:0] bitpos;
    reg           strict;
    reg  [  XW:0] cnt;
    reg  [  WA:0] wi;
    reg  [  WA:0] cwords;
    reg  [ W-1:0] hits_r;
    reg           hits_v;
    reg  [  63:0] T;
    reg  [  XW:0] tie_left;
    reg  [  WA:0] ea;
    reg  [  WA:0] ewords;
    reg  [  63:0] glo;     // the score range of bin b* (signed)
    reg  [  63:0] ghi;
    reg  [  WA:0] ga;      // gather: next word to load
    reg  [W*64-1:0] gword; // gather: the loaded word and its scores still to take
    reg  [ W-1:0] gmask;

    // -- the scores and the histograms ------------------------------------------------------
    wire                  up_valid;
    wire [     SLOTS-1:0] up_mask;
    wire [  SLOTS*64-1:0] up_vals;
    wire                  up_final;
    wire [     W*64-1:0] wword;  // word `saddr` of slot `sel`, a cycle after the address
    reg  [       WA-1:0] saddr;

    hm_score_mem #(
        .SLOTS(SLOTS),
        .NMAX(NMAX),
        .W(W),
        .XW(XW)
    ) u_scores (
        .clk(clk),
        .in_valid(in_valid),
        .in_idx(in_idx),
        .in_mask(in_mask),
        .in_scores(in_scores),
        .in_op(in_op),
        .in_final(in_final),
        .up_valid(up_valid),
        .up_mask(up_mask),
        .up_vals(up_vals),
        .up_final(up_final),
        .rslot(sel),
        .raddr(saddr),
        .rword(wword)
    );

    wire [SLOTS*(XW+1)-1:0] hcount_all;
    wire [SLOTS*(XW+1)-1:0] ccount_all;
    wire [      SLOTS*64-1:0] smax_all;
    wire [         SLOTS-1:0] hbusy;
    // the fine bin to read: S_FINE walks down one bin a cycle, S_COARSE presents the top
    // bin of the group it stands on, so each count is there when its cycle comes
    wire [11:0] hbin_rd = (state == S_FINE) ? b - 1'b1 : {g, 6'h3f};

    genvar s;
    generate
        for (s = 0; s < SLOTS; s = s + 1) begin : g_slot
            hm_histogram #(
                .NMAX(NMAX),
                .XW(XW)
            ) u_hist (
                .clk(clk),
                .clear(clear),
                .we(up_valid && up_mask[s] && up_final),
                .wval(up_vals[64*s+:64]),
                .busy(hbusy[s]),
                .hbin(hbin_rd),
                .hcount(hcount_all[(XW+1)*s+:XW+1]),
                .cgroup(g),
                .ccount(ccount_all[(XW+1)*s+:XW+1]),
                .smax(smax_all[64*s+:64]),
                .sany()
            );
        end
    endgenerate

    wire [XW:0] hcount = hcount_all[(XW+1)*sel+:XW+1];
    wire [XW:0] ccount = ccount_all[(XW+1)*sel+:XW+1];
    wire [63:0] smax = smax_all[64*sel+:64];

    // -- candidate buffer: W RAMs, candidate j in RAM j mod W at j / W ----------------------
    wire [W*64-1:0] cb_word;  // word `cb_raddr`, a cycle after the address
    wire [WA-1:0] cb_raddr = (state == S_CNT) ? wi[WA-1:0] + 1'b1 : {WA{1'b0}};

    // gather: take the lowest candidate left in the loaded word
    reg [LW-1:0] gp;
    reg [63:0] gval;
    integer q;
    always @(*) begin
        gp = {LW{1'b0}};
        for (q = W - 1; q >= 0; q = q - 1) if (gmask[q]) gp = q[LW-1:0];
        gval = SIGN;  // a W-way select written out, not a shifter of the whole word
        for (q = 0; q < W; q = q + 1) if (gp == q) gval = gword[64*q+:64] ^ SIGN;
    end
    wire gtake = state == S_GATHER && gmask != {W{1'b0}};
    wire [W-1:0] gleft = gmask & (gmask - 1'b1);  // after taking the lowest
    wire gload = state == S_GATHER && gleft == {W{1'b0}} && ga != ewords;

    genvar cl;
    generate
        for (cl = 0; cl < W; cl = cl + 1) begin : g_cb
            hm_ram #(
                .DEPTH(NMAX / W),
                .WIDTH(64),
                .AW(WA),
                .ULTRA(0)
            ) u_cb (
                .clk(clk),
                .we(gtake && j[LW-1:0] == cl),
                .waddr(j[XW-1:LW]),
                .wdata(gval),
                .raddr(cb_raddr),
                .rdata(cb_word[64*cl+:64])
            );
        end
    endgenerate

    // the scores of a word that fall in b*'s range
    function [W-1:0] bin_hits;
        input [W*64-1:0] word;
        input [WA:0] wordi;
        input [XW:0] count;
        input [63:0] lo;
        input [63:0] hi;
        integer p;
        begin
            for (p = 0; p < W; p = p + 1) begin
                bin_hits[p] = 1'b0;
                if (({{(XW - WA) {1'b0}}, wordi} << LW) + p < {1'b0, count})
                    bin_hits[p] = $signed(word[64*p+:64]) >= $signed(lo)
                                  && $signed(word[64*p+:64]) <= $signed(hi);
            end
        end
    endfunction

    // The lowest |s| code (hm_histogram's key, inverted) and the width - 1 of the bin whose
    // bit length and mantissa are em.
    function [62:0] em_lo;
        input [10:0] em;
        reg [62:0] top;
        begin
            top = {57'd0, 1'b1, em[4:0]};
            if (em[10:5] == 6'd0) em_lo = 63'd0;
            else if (em[10:5] >= 6'd6) em_lo = top << (em[10:5] - 6'd6);
            else em_lo = top >> (6'd6 - em[10:5]);
        end
    endfunction
    function [62:0] em_span;
        input [10:0] em;
        begin
            em_span = (em[10:5] > 6'd6) ? ((63'd1 << (em[10:5] - 6'd6)) - 1'b1) : 63'd0;
        end
    endfunction
    wire [10:0] b_em = b[11] ? b[10:0] : ~b[10:0];
    wire [62:0] b_xlo = em_lo(b_em);
    wire [62:0] b_xhi = b_xlo + em_span(b_em);
    // bin b's scores, signed: non-negative |s| = s; negative |s| = ~s
    wire [63:0] b_lo = b[11] ? {1'b0, b_xlo} : {1'b1, ~b_xhi};
    wire [63:0] b_hi = b[11] ? {1'b0, b_xhi} : {1'b1, ~b_xlo};

    // one counting pass word: candidates >= cmp_t (or > cmp_t when strict)
    function [W-1:0] pass_hits;
        input [W*64-1:0] word;
        input [WA:0] wordi;
        input [XW:0] count;
        input [63:0] t;
        input gt;
        integer p;
        begin
            for (p = 0; p < W; p = p + 1) begin
                pass_hits[p] = 1'b0;
                if (({{(XW - WA) {1'b0}}, wordi} << LW) + p < {1'b0, count})
                    pass_hits[p] = gt ? (word[64*p+:64] > t) : (word[64*p+:64] >= t);
            end
        end
    endfunction

    integer i;
    function [XW:0] popcount;
        input [W-1:0] m;
        integer p;
        begin
            popcount = {(XW + 1) {1'b0}};
            for (p = 0; p < W; p = p + 1) popcount = popcount + m[p];
        end
    endfunction

    function [5:0] msb64;
        input [63:0] v;
        integer p;
        begin
            msb64 = 6'd0;
            for (p = 0; p < 64; p = p + 1) if (v[p]) msb64 = p[5:0];
        end
    endfunction

    // -- the index-ascending scan (one word of W scores per cycle) ---------------------------
    reg [W-1:0] emask;
    reg [XW:0] taken;
    always @(*) begin
        emask = {W{1'b0}};
        taken = {(XW + 1) {1'b0}};
        for (i = 0; i < W; i = i + 1) begin
            if (({{(XW - WA) {1'b0}}, ea} << LW) + i < {1'b0, n_r}) begin
                if (bitmap_r) begin
                    emask[i] = $signed(wword[64*i+:64]) >= $signed(thr);
                end else if ((wword[64*i+:64] ^ SIGN) > T) begin
                    emask[i] = 1'b1;
                end else if ((wword[64*i+:64] ^ SIGN) == T && taken < tie_left) begin
                    emask[i] = 1'b1;
                    taken = taken + 1'b1;
                end
            end
        end
    end

    // bitmap words left: ceil(nout / 32) - 32-bit words already emitted
    wire [XW:0] bm_words = (nout_r + 6'd31) >> 5;
    localparam [4:0] WPW = W / 32;  // bitmap words per scan word (W <= 512)
    wire [XW+1:0] bm_done = ea * WPW;
    wire [XW+1:0] bm_left = {1'b0, bm_words} - bm_done;
    wire [4:0] nwords = (bm_left < WPW) ? bm_left[4:0] : WPW;

    wire emit_valid = state == S_EMIT;
    wire emit_ready;
    wire packer_idle;

    // the score word to read next cycle: the scans present it a cycle ahead, and word 0 is
    // presented in every other state, ready for the first cycle of a scan
    always @(*) begin
        saddr = {WA{1'b0}};
        if (state == S_EMIT) saddr = emit_ready ? ea[WA-1:0] + 1'b1 : ea[WA-1:0];
        else if (state == S_GATHER) saddr = gload ? ga[WA-1:0] + 1'b1 : ga[WA-1:0];
    end

    hm_index_packer #(
        .W(W)
    ) u_packer (
        .clk(clk),
        .rst(rst),
        .in_valid(emit_valid),
        .in_ready(emit_ready),
        .in_kind(bitmap_r),
        .in_mask(emask),
        .in_base({{(31 - XW) {1'b0}}, ea, {LW{1'b0}}}),
        .in_words({{(512 - W) {1'b0}}, emask}),
        .in_nwords(nwords),
        .flush(flush),
        .idle(packer_idle),
        .out_data(out_data),
        .out_items(out_items),
        .out_valid(out_valid),
        .out_ready(out_ready)
    );

    // a stored score still on its way to the histograms holds new commands back
    assign cmd_ready = state == S_IDLE && !up_valid && hbusy == {SLOTS{1'b0}};
    assign idle = state == S_IDLE && packer_idle;

    wire [XW:0] acc_ccount = above + ccount;
    wire [XW:0] acc_hcount = above + hcount;
    wire [5:0] bin_e = b_em[10:5];
    wire [5:0] top_bit = msb64(vmin ^ vmax);
    wire [63:0] below_top = {64{1'b1}} >> (6'd63 - top_bit);  // bits [top_bit:0]
    wire [63:0] tnext = (cnt >= need) ? cmp_t : tcur;

    always @(posedge clk) begin
        cmd_done <= 1'b0;
        if (rst) begin
            state <= S_IDLE;
        end else begin
            case (state)
                S_IDLE:
                if (cmd_valid && cmd_ready) begin
                    sel      <= cmd_slot;
                    n_r      <= cmd_n;
                    nout_r   <= cmd_nout;
                    k_r      <= cmd_k;
                    bitmap_r <= cmd_bitmap;
                    delta_r  <= cmd_delta;
                    state    <= S_PREP;
                end
                S_PREP: begin
                    thr   <= smax - {32'd0, delta_r};
                    g     <= 6'd63;
                    above <= 0;
                    ea    <= 0;
                    ewords <= ((bitmap_r ? nout_r : n_r) + W - 1) >> LW;
                    state <= bitmap_r ? S_EMIT : S_COARSE;
                end
                S_COARSE:
                if (acc_ccount >= k_r) begin
                    b     <= {g, 6'h3f};
                    state <= S_FINE;
                end else begin
                    above <= acc_ccount;
                    g     <= g - 1'b1;
                end
                S_FINE:
                if (acc_hcount >= k_r) begin
                    need  <= k_r - above;
                    c     <= hcount;
                    j     <= 0;
                    ga    <= 0;
                    gmask <= {W{1'b0}};
                    glo   <= b_lo;
                    ghi   <= b_hi;
                    if (bin_e <= 6'd6 || k_r - above == hcount) begin
                        // one value in the bin, or all of it taken: T is its lowest score
                        T        <= b_lo ^ SIGN;
                        tie_left <= k_r - above;
                        state    <= S_EMIT;
                    end else begin
                        state <= S_GATHER;
                    end
                end else begin
                    above <= acc_hcount;
                    b     <= b - 1'b1;
                end
                S_GATHER: begin
                    if (gtake) begin
                        if (j == 0 || gval < vmin) vmin <= gval;
                        if (j == 0 || gval > vmax) vmax <= gval;
                        j <= j + 1'b1;
                    end
                    if (gload) begin
                        gword <= wword;
                        gmask <= bin_hits(wword, ga, n_r, glo, ghi);
                        ga    <= ga + 1'b1;
                    end else begin
                        gmask <= gleft;
                    end
                    if (gleft == {W{1'b0}} && ga == ewords) state <= S_DECIDE;
                end
                S_DECIDE: begin
                    wi     <= 0;
                    cnt    <= 0;
                    hits_v <= 1'b0;
                    cwords <= (c + W - 1) >> LW;
                    if (vmin == vmax) begin
                        T        <= vmin;
                        tie_left <= need;
                        state    <= S_EMIT;
                    end else begin
                        bitpos <= top_bit;
                        tcur   <= vmax & ~below_top;
                        cmp_t  <= (vmax & ~below_top) | (64'd1 << top_bit);
                        strict <= 1'b0;
                        state  <= S_CNT;
                    end
                end
                S_CNT: begin
                    hits_r <= pass_hits(cb_word, wi, c, cmp_t, strict);
                    hits_v <= 1'b1;
                    if (hits_v) cnt <= cnt + popcount(hits_r);
                    wi <= wi + 1'b1;
                    if (wi + 1'b1 == cwords) state <= S_CNT_END;
                end
                S_CNT_END: begin
                    cnt    <= cnt + popcount(hits_r);
                    hits_v <= 1'b0;
                    state  <= S_LEVEL;
                end
                S_LEVEL: begin
                    wi <= 0;
                    cnt <= 0;
                    if (strict) begin
                        tie_left <= need - cnt;
                        state    <= S_EMIT;
                    end else if (bitpos == 6'd0) begin
                        T      <= tnext;
                        cmp_t  <= tnext;
                        strict <= 1'b1;
                        state  <= S_CNT;
                    end else begin
                        tcur   <= tnext;
                        cmp_t  <= tnext | (64'd1 << (bitpos - 1'b1));
                        bitpos <= bitpos - 1'b1;
                        state  <= S_CNT;
                    end
                end
                S_EMIT:
                if (emit_ready) begin
                    tie_left <= tie_left - taken;
                    ea       <= ea + 1'b1;
                    if (ea + 1'b1 == ewords) state <= S_DONE;
                end
                S_DONE: begin
                    cmd_done <= 1'b1;
                    state    <= S_IDLE;
                end
                default: state <= S_IDLE;
            endcase
        end
    end
endmodule

`default_nettype wire
