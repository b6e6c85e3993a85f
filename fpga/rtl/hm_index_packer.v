// hm_index_packer: packs the selection into 512-bit output beats of 16 uint32, in order.
// Input per cycle, either a W-bit mask of selected candidates (kind 0: emits base + i for each
// set bit i, lowest first, up to 16 per cycle, holding the rest) or up to 16 ready 32-bit
// words (kind 1: threshold bitmap words). The items of successive inputs continue one stream
// (the [queries, k] or [queries, words] output is contiguous); `flush` emits the partial last
// beat with its item count (the writer turns it into byte strobes).
`default_nettype none

module hm_index_packer #(
    parameter W = 64
) (
    input wire clk,
    input wire rst,

    input  wire         in_valid,
    output wire         in_ready,
    input  wire         in_kind,    // 0: mask of indices, 1: words
    input  wire [W-1:0] in_mask,
    input  wire [ 31:0] in_base,
    input  wire [511:0] in_words,
    input  wire [  4:0] in_nwords,  // 0..16

    input  wire flush,
    output wire idle,

    output reg  [511:0] out_data,
    output reg  [  4:0] out_items,  // 1..16
    output reg          out_valid,
    input  wire         out_ready
);
    reg          pend_valid;
    reg          pend_kind;
    reg  [W-1:0] pend_mask;
    reg  [ 31:0] pend_base;
    reg  [511:0] pend_words;
    reg  [  4:0] pend_nwords;

    reg  [1023:0] acc;  // items [0, fill) pending, the rest zero
    reg  [   4:0] fill;  // 0..15 between cycles

    wire can_append = !out_valid || out_ready;

    // up to 16 lowest set bits of the pending mask: bit i is item number below[i] (the set
    // bits under it), so item j is the one set bit whose count below is j (a one-hot select
    // per item, not a chain of W variable-position writes)
    localparam LW = $clog2(W);
    reg  [511:0] items;
    reg  [  5:0] count;
    reg  [W-1:0] rest;
    reg  [LW:0] below [0:W-1];
    reg  [LW:0] ones;
    reg  [LW-1:0] pos;
    reg         hit;
    integer i, j;
    always @(*) begin
        ones = {(LW + 1) {1'b0}};
        for (i = 0; i < W; i = i + 1) begin
            below[i] = ones;
            ones = ones + pend_mask[i];
        end
        items = 512'd0;
        count = 6'd0;
        rest  = pend_mask;
        pos   = {LW{1'b0}};
        hit   = 1'b0;
        if (pend_kind) begin
            items = pend_words;
            count = {1'b0, pend_nwords};
            rest  = {W{1'b0}};
        end else begin
            for (i = 0; i < W; i = i + 1) if (below[i] < 16) rest[i] = 1'b0;
            count = (ones > 16) ? 6'd16 : ones;
            for (j = 0; j < 16; j = j + 1) begin
                pos = {LW{1'b0}};
                hit = 1'b0;
                for (i = 0; i < W; i = i + 1)
                    if (pend_mask[i] && below[i] == j) begin
                        pos = pos | i[LW-1:0];
                        hit = 1'b1;
                    end
                if (hit) items[32*j+:32] = pend_base + pos;
            end
        end
    end

    wire          step = pend_valid && can_append;
    wire          drains = step && rest == {W{1'b0}};
    wire [1023:0] merged = acc | ({512'd0, items} << {fill, 5'd0});
    wire [   5:0] total = {1'b0, fill} + count;

    assign in_ready = !pend_valid || drains;
    assign idle = !pend_valid && fill == 5'd0 && !out_valid;

    always @(posedge clk) begin
        if (rst) begin
            pend_valid <= 1'b0;
            fill       <= 5'd0;
            acc        <= 1024'd0;
            out_valid  <= 1'b0;
        end else begin
            if (out_valid && out_ready) out_valid <= 1'b0;
            if (step) begin
                if (total >= 6'd16) begin
                    out_data  <= merged[511:0];
                    out_items <= 5'd16;
                    out_valid <= 1'b1;
                    acc       <= merged >> 512;
                    fill      <= total[4:0] - 5'd16;
                end else begin
                    acc  <= merged;
                    fill <= total[4:0];
                end
                pend_mask <= rest;
                if (drains) pend_valid <= 1'b0;
            end else if (flush && !pend_valid && fill != 5'd0 && can_append) begin
                out_data  <= acc[511:0];
                out_items <= fill;
                out_valid <= 1'b1;
                acc       <= 1024'd0;
                fill      <= 5'd0;
            end
            if (in_valid && in_ready) begin
                pend_valid  <= 1'b1;
                pend_kind   <= in_kind;
                pend_mask   <= in_mask;
                pend_base   <= in_base;
                pend_words  <= in_words;
                pend_nwords <= in_nwords;
            end
        end
    end
endmodule

`default_nettype wire
