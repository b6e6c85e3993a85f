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
    // the chunk's products, summed (evaluated once per valid chunk, in the clocked block)
    function signed [ACC_W-1:0] chunk_sum;
        input q_mode;
        input [511:0] a;
        input [511:0] b;
        input [511:0] q;
        integer i;
        begin
            chunk_sum = {ACC_W{1'b0}};
            if (q_mode) begin
                for (i = 0; i < 32; i = i + 1) begin
                    if (q[8*i+7]) chunk_sum = chunk_sum + $signed(q[8*i+:8]) * $signed(a[16*i+:16]);
                    else chunk_sum = chunk_sum + $signed(q[8*i+:8]) * $signed(b[16*i+:16]);
                end
            end else begin
                for (i = 0; i < 64; i = i + 1)
                    chunk_sum = chunk_sum + $signed(q[8*i+:8]) * $signed(a[8*i+:8]);
            end
        end
    endfunction

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
        if (in_valid) s1_psum <= chunk_sum(quest, in_a, in_b, in_q);
        if (s1_valid) begin
            acc <= total;
            if (s1_last) out_dot <= total;
        end
    end
endmodule

`default_nettype wire
