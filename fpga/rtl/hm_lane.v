// hm_lane: one integer dot-product lane. Each cycle it takes one row-aligned 512-bit chunk of a
// memory row and the matching chunk of its query vector, and accumulates across the chunks of
// the row; the row's dot product comes out two cycles after its last chunk.
//   quest = 0: 64 int8 x int8 products (indexer keys, block keys, document embeddings);
//   quest = 1: the Quest bound over 32 channels, q_i * (q_i < 0 ? min_i : max_i) with int16
//              page minima (in_a) and maxima (in_b) and int8 q_i (low 32 bytes of in_q).
`default_nettype none

module hm_lane #(
    parameter ACC_W = 48  // exact for rows up to 2**16 channels of int8 x int16
) (
    input  wire                    clk,
    input  wire                    rst,
    input  wire                    quest,
    input  wire                    in_valid,
    input  wire                    in_first,
    input  wire                    in_last,
    input  wire        [      511:0] in_a,
    input  wire        [      511:0] in_b,
    input  wire        [      511:0] in_q,
    output reg                     out_valid,
    output reg  signed [ACC_W-1:0] out_dot
);
    // One set of 64 signed 8 x 16 multipliers serves both modes: its 16-bit operand is the
    // int8 key (sign-extended) or, for the first 32 products in Quest mode, the page minimum
    // or maximum chosen by the sign of q_i (the other 32 are zero there). Each product takes
    // a DSP48E2; their sum is a balanced tree of narrow adders (24-bit products,
    // 30-bit sum), each an hm_add.
    localparam PW = 24;
    localparam SUMW = PW + 6;

    // Every product and every sum is a net of its own (not a slice of one wide vector): an
    // event-driven simulator then re-evaluates only the adders whose operands changed.
    genvar i;
    generate
        for (i = 0; i < 64; i = i + 1) begin : g_mul
            wire signed [7:0] qi = in_q[8*i+:8];
            wire signed [15:0] xi;
            if (i < 32) begin : g_both
                assign xi = quest ? (qi[7] ? in_a[16*i+:16] : in_b[16*i+:16])
                                  : {{8{in_a[8*i+7]}}, in_a[8*i+:8]};
            end else begin : g_dot
                assign xi = quest ? 16'd0 : {{8{in_a[8*i+7]}}, in_a[8*i+:8]};
            end
            wire signed [PW-1:0] p = qi * xi;
        end
    endgenerate

    // adder tree: level k has 64 >> k sums of PW + k bits (each level one bit wider)
    genvar k, j;
    generate
        for (k = 1; k <= 6; k = k + 1) begin : g_lvl
            for (j = 0; j < (64 >> k); j = j + 1) begin : g_add
                wire signed [PW+k-2:0] a, b;
                wire signed [PW+k-1:0] y;
                if (k == 1) begin : g_in
                    assign a = g_mul[2*j].p;
                    assign b = g_mul[2*j+1].p;
                end else begin : g_in
                    assign a = g_lvl[k-1].g_add[2*j].y;
                    assign b = g_lvl[k-1].g_add[2*j+1].y;
                end
                hm_add #(
                    .W(PW + k - 1)
                ) u_add (
                    .a(a),
                    .b(b),
                    .y(y)
                );
            end
        end
    endgenerate
    wire [SUMW-1:0] chunk = g_lvl[6].g_add[0].y;

    reg s1_valid, s1_first, s1_last;
    reg signed [ACC_W-1:0] s1_psum;
    reg signed [ACC_W-1:0] acc;
    wire signed [ACC_W-1:0] total = (s1_first ? {ACC_W{1'b0}} : acc) + s1_psum;

    always @(posedge clk) begin
        if (rst) begin
            s1_valid  <= 1'b0;
            out_valid <= 1'b0;
        end else begin
            s1_valid  <= in_valid;
            out_valid <= s1_valid && s1_last;
        end
        s1_first <= in_first;
        s1_last  <= in_last;
        if (in_valid) s1_psum <= {{(ACC_W - SUMW) {chunk[SUMW-1]}}, chunk};
        if (s1_valid) begin
            acc <= total;
            if (s1_last) out_dot <= total;
        end
    end
endmodule

`default_nettype wire
